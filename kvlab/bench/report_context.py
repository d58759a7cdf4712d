"""What every section of the HTML report shares: the rows and their presentation, and small
HTML pieces.

- :class:`ReportContext`: the result rows plus recipe order, display labels, one colour per
  recipe and the (model, mode) scopes a section is drawn for.
- :func:`escape`, :func:`note`, :func:`subheading`: escaped text, a grey note, a scope's
  subheading.
- :func:`tokens`, :func:`context_lengths`, :func:`join`: how token counts, the distinct
  context lengths and lists of values are shown.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

from matplotlib import colormaps
from matplotlib.colors import to_hex

from kvlab.bench.summary import FULL, first_seen, recipe_labels, recipe_order

FULL_COLOUR = "#222222"

Rows = list[dict[str, Any]]


class ReportContext:
    """The rows plus what every section needs: recipe order, labels, colours, scopes."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows
        self.recipes = recipe_order(rows)
        self.labels = recipe_labels(rows)
        self.models = [str(m) for m in first_seen(rows, "model")]
        self.modes = [str(m) for m in first_seen(rows, "mode")]
        self.lengths = context_lengths(rows)
        self.has_full = FULL in self.recipes
        palette = [to_hex(c) for c in colormaps["tab10"].colors if to_hex(c) != "#7f7f7f"]
        others = [r for r in self.recipes if r != FULL]
        self.colours = {r: palette[i % len(palette)] for i, r in enumerate(others)}
        self.colours[FULL] = FULL_COLOUR
        self.scopes = list(dict.fromkeys((r["model"], r["mode"]) for r in rows))

    def scoped(self) -> list[tuple[str | None, Rows]]:
        """(subheading or None when there is one scope, rows) per (model, mode)."""
        if len(self.scopes) == 1:
            return [(None, self.rows)]
        return [
            (f"{model} / {mode}",
             [r for r in self.rows if (r["model"], r["mode"]) == (model, mode)])
            for model, mode in self.scopes
        ]

    def recipes_in(self, rows: Rows) -> list[str]:
        present = {r["recipe"] for r in rows}
        return [r for r in self.recipes if r in present]


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def subheading(title: str | None) -> str:
    return f"<h3>{escape(title)}</h3>" if title else ""


def join(values: Iterable[Any]) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values) if values else "-"


def tokens(n: int | None) -> str:
    """A token count with thousands separators ("-" when the row has none)."""
    return "-" if n is None else f"{n:,}"


def context_lengths(rows: Rows) -> list[int | None]:
    """The distinct context lengths (target_tokens), ascending, a missing one last."""
    return sorted({r["target_tokens"] for r in rows}, key=lambda n: (n is None, n or 0))
