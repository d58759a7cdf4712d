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
import re
from collections.abc import Iterable
from typing import Any

from matplotlib import colormaps
from matplotlib.colors import to_hex, to_rgb

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
        self.families = {r: method_family(r) for r in self.recipes}
        self.colours, self.markers = recipe_styles(self.recipes)
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


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def method_family(recipe: str) -> str:
    """The methods of a recipe without their parameters: ``snapkv(budget=0.5) + think(...)``
    -> ``snapkv + think``; recipes of one family differ only in their settings."""
    return re.sub(r"\([^()]*\)", "", recipe).strip() or recipe


def recipe_styles(recipes: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """A colour and a marker per recipe: one hue per method family (``full`` dark grey), from
    dark to light for the family's settings in order of appearance, and a marker per setting,
    so that the recipes of one family read as one sweep and each stays distinguishable."""
    palette = [to_hex(c) for c in colormaps["tab10"].colors if to_hex(c) != "#7f7f7f"]
    palette += [to_hex(c) for c in colormaps["Dark2"].colors]
    families: dict[str, list[str]] = {}
    for recipe in recipes:
        families.setdefault(method_family(recipe), []).append(recipe)
    colours: dict[str, str] = {}
    markers: dict[str, str] = {}
    hue = 0
    for family, members in families.items():
        base = FULL_COLOUR if family == FULL else palette[hue % len(palette)]
        hue += family != FULL
        r, g, b = to_rgb(base)
        for i, recipe in enumerate(members):
            mix = 0.0 if len(members) == 1 else 0.5 * i / (len(members) - 1)  # towards white
            colours[recipe] = to_hex((r + (1 - r) * mix, g + (1 - g) * mix, b + (1 - b) * mix))
            markers[recipe] = MARKERS[i % len(MARKERS)]
    return colours, markers


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
