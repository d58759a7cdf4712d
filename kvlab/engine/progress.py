"""kvlab's one progress display for long work (the prefill, DuoAttention's head identification)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def progress_bar(show: bool, unit: str = "tokens") -> Progress:
    """A progress display on stderr, removed when done: ``done/total unit`` and the time left;
    nothing when ``show`` is false."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(),
        TextColumn(f"{{task.completed}}/{{task.total}} {unit}"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True, disable=not show,
    )


__all__ = ["progress_bar"]
