"""The report's plots: matplotlib figures embedded in the page as base64 PNG.

- :data:`PLOT_STYLE` (rc parameters every figure is drawn with) and :func:`embed_figure`
  (a figure as an HTML ``<figure>`` with its PNG inline and a caption).
- :func:`turns_section`: accuracy per turn, for cases with more than one turn.
- :func:`needle_section`: accuracy on a context length x needle depth grid, one panel per
  recipe.
- :func:`speed_section`: context prefill, decode per token, KV memory and peak RSS bars.
- :func:`fidelity_section`: token agreement with and KL from the ``full`` recipe, as bars.

Accuracy vs KV memory, with its Pareto frontier, is in :mod:`kvlab.bench.pareto`. Figures are
drawn on :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no display
needed).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kvlab.bench.report_context import (
    ReportContext,
    Rows,
    context_lengths,
    escape,
    note,
    subheading,
    tokens,
)
from kvlab.bench.summary import FULL, adaptive_number, summarize

PLOT_STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 100,
}
_DPI = 130  # saved resolution; images are shown at 100 px per inch of figure width
_MISSING = "#d9d9d9"

# (key in a summarize() dict, panel title with unit, value shown from that dict)
Panel = tuple[str, str, Callable[[dict[str, Any]], float | None]]


def embed_figure(fig: Figure, alt: str, caption: str | None = None) -> str:
    """``fig`` as an HTML figure: the PNG inline (base64), shown at 100 px per inch."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white")
    width = round(fig.get_figwidth() * 100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(alt)}" '
            f'style="width:{width}px">{cap}</figure>')


LEGEND_ROWS = 14
"""Most legend entries beside a plot; a longer legend goes under it in LEGEND_COLUMNS columns."""
LEGEND_COLUMNS = 3


# --- accuracy per turn --------------------------------------------------------------------

def turns_section(ctx: ReportContext) -> str:
    parts = []
    for title, rows in ctx.scoped():
        last = {}
        for r in rows:
            key = (r.get("settings_id"), r["case_id"])
            last[key] = max(last.get(key, 0), r["turn"])
        multi = [r for r in rows if last[(r.get("settings_id"), r["case_id"])] > 0]
        if not multi:
            parts.append(subheading(title) + note(
                "Every case here has a single turn: nothing to plot per turn."))
            continue
        summaries = summarize(multi)
        turns = max(len(s["accuracy_by_turn"]) for s in summaries)
        below = len(summaries) > LEGEND_ROWS  # a long legend goes under the plot, in columns
        legend_rows = math.ceil(len(summaries) / LEGEND_COLUMNS) if below else 0
        fig = Figure(figsize=(9.5, 4.2 + 0.2 * legend_rows), layout="constrained")
        ax = fig.subplots()
        for s in summaries:
            values = [math.nan if v is None else v * 100 for v in s["accuracy_by_turn"]]
            # full dashed and on top, so a recipe that matches it stays visible in the gaps
            style = dict(linestyle="--", zorder=4) if s["recipe"] == FULL else {}
            ax.plot(range(1, len(values) + 1), values, marker="o", linewidth=2, markersize=6,
                    color=ctx.colours[s["recipe"]], label=s["label"], **style)
        ax.set_xticks(range(1, turns + 1))
        ax.set_xlim(0.7, turns + 0.3)
        ax.set_ylim(-3, 105)
        ax.set_xlabel("turn (1 = first question on the context)")
        ax.set_ylabel("accuracy (%)")
        if below:
            fig.legend(loc="outside lower center", ncols=LEGEND_COLUMNS, frameon=False,
                       title="recipe", fontsize="small")
        else:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="recipe")
        tasks = ", ".join(dict.fromkeys(r["task"] for r in multi))
        n_cases = len({(r.get("settings_id"), r["case_id"]) for r in multi})
        caption = (f"Mean accuracy at each turn over the {n_cases} cases with more than one turn "
                   f"({tasks}), all context lengths pooled; cases with a single question are "
                   "left out.")
        parts.append(subheading(title) + embed_figure(fig, "accuracy per turn", caption))
    return "\n".join(parts)


# --- needle heat maps ---------------------------------------------------------------------

def _depth_bins(depths: list[float]) -> tuple[list[str], Callable[[float], int]]:
    """Column labels (depth in % of the context) and a depth -> column function: one column per
    distinct depth when there are at most 11, else ten 10 % bins."""
    distinct = sorted(set(depths))
    if len(distinct) <= 11:
        index = {d: i for i, d in enumerate(distinct)}
        return [f"{d * 100:.0f}" for d in distinct], index.__getitem__
    labels = [f"{10 * i}-{10 * i + 10}" for i in range(10)]
    return labels, lambda d: min(max(int(d * 10), 0), 9)


def _text_colour(rgb: tuple[float, float, float]) -> str:
    r, g, b = rgb
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _two_lines(label: str, width: int = 16) -> str:
    """A long recipe label broken before its parameters, so narrow panel titles don't collide."""
    return label if len(label) <= width else label.replace("(", "\n(", 1)


def needle_section(ctx: ReportContext) -> str:
    parts = []
    any_depth = False
    cmap = colormaps["RdYlGn"]
    for title, rows in ctx.scoped():
        drows = [r for r in rows if r["depth"] is not None and r["score"] is not None]
        if not drows:
            continue
        any_depth = True
        recipes = ctx.recipes_in(drows)
        lengths = context_lengths(drows)
        labels, column = _depth_bins([r["depth"] for r in drows])
        panel_w = 0.48 * len(labels) + 1.3
        most = max(1, min(len(recipes), int(12.5 // panel_w)))
        nrows = math.ceil(len(recipes) / most)
        ncols = math.ceil(len(recipes) / nrows)  # balanced: 2 x 2 rather than 3 + 1
        panel_h = 0.42 * len(lengths) + 1.3
        fig = Figure(figsize=(min(12.5, panel_w * ncols + 1.2), panel_h * nrows + 0.4),
                     layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        image = None
        for ax, recipe in zip(axes, recipes):
            sums = [[0.0] * len(labels) for _ in lengths]
            counts = [[0] * len(labels) for _ in lengths]
            for r in drows:
                if r["recipe"] != recipe:
                    continue
                i, j = lengths.index(r["target_tokens"]), column(r["depth"])
                sums[i][j] += r["score"]
                counts[i][j] += 1
            grid = [[sums[i][j] / counts[i][j] * 100 if counts[i][j] else math.nan
                     for j in range(len(labels))] for i in range(len(lengths))]
            image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
            ax.set_facecolor(_MISSING)
            for i in range(len(lengths)):
                for j in range(len(labels)):
                    v = grid[i][j]
                    text = "-" if math.isnan(v) else f"{v:.0f}"
                    colour = "#555555" if math.isnan(v) else _text_colour(cmap(v / 100)[:3])
                    ax.text(j, i, text, ha="center", va="center", fontsize=10, color=colour)
            ax.set_xticks(range(len(labels)), labels)
            ax.set_yticks(range(len(lengths)), [tokens(n) for n in lengths])
            ax.set_xlabel("needle depth (%)")
            ax.set_ylabel("context (tokens)")
            ax.set_title(_two_lines(ctx.labels[recipe]), color=ctx.colours[recipe], fontsize=10)
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(False)
        for ax in axes[len(recipes):]:
            ax.set_visible(False)
        if image is not None:
            bar = fig.colorbar(image, ax=list(axes[:len(recipes)]), shrink=0.9, pad=0.02)
            bar.set_label("accuracy (%)")
        tasks = ", ".join(dict.fromkeys(r["task"] for r in drows))
        caption = (f"Mean accuracy (%) of needle cases ({tasks}) in each cell of context length "
                   "x needle depth (0 % = start of the context); one panel per recipe, one "
                   "colour scale (0-100 %). '-': no case in that cell.")
        parts.append(subheading(title) + embed_figure(fig, "needle heat maps", caption))
    if not any_depth:
        return note("No needle rows in these results (no row has a depth), so no length x "
                    "depth heat map. Run needle tasks (niah_*) to get one.")
    return "\n".join(parts)


# --- bars ---------------------------------------------------------------------------------

def _wrap(label: str, width: int = 16) -> str:
    """A recipe label on several short lines: one per method, long argument lists broken."""
    lines = []
    for i, part in enumerate(label.split(" + ")):
        part = ("+ " if i else "") + part
        while len(part) > width and ", " in part[:width + 8]:
            cut = part.rfind(", ", 0, width + 8)
            lines.append(part[:cut + 1])
            part = "  " + part[cut + 2:]
        if len(part) > width and "(" in part:
            cut = part.index("(")
            lines.append(part[:cut])
            part = "  " + part[cut:]
        lines.append(part)
    return "\n".join(lines)


def _bar_figure(ctx: ReportContext, rows: Rows, panels: list[Panel], recipes: list[str]) -> Figure:
    """Small multiples of bars, one panel per (key, title with unit, value) and a bar per
    recipe, grouped by context length when there are several."""
    per_length = summarize(rows, by=("target_tokens",))
    lengths = context_lengths(per_length)
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    slots = max(3, len(recipes))  # a lone recipe gets a bar of normal width, not the panel
    panel_in = max(4.2, 1.0 + 0.75 * slots * max(1.0, len(lengths) / 2))
    width_in = min(12.0, panel_in * ncols)
    fig = Figure(figsize=(width_in, 3.6 * nrows + (0.5 if len(lengths) > 1 else 0)),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    shades = colormaps["Blues"]
    group = 0.8
    bar_w = group / max(1, len(lengths))
    for ax, (_, title, value) in zip(axes, panels):
        for j, n in enumerate(lengths):
            xs, ys, colours = [], [], []
            for i, recipe in enumerate(recipes):
                s = next((s for s in per_length
                          if s["recipe"] == recipe and s["target_tokens"] == n), None)
                v = value(s) if s is not None else None
                if v is None:
                    continue
                xs.append(i - group / 2 + bar_w * (j + 0.5))
                ys.append(v)
                colours.append(ctx.colours[recipe] if len(lengths) == 1
                               else shades(0.35 + 0.6 * j / max(1, len(lengths) - 1)))
            bars = ax.bar(xs, ys, width=bar_w * 0.92, color=colours,
                          label=f"{tokens(n)} tokens")
            if len(lengths) == 1 and ys:
                ax.bar_label(bars, labels=[adaptive_number(v) for v in ys], padding=2, fontsize=9)
        ax.set_title(title)
        ax.set_xticks(range(len(recipes)), [_wrap(ctx.labels[r]) for r in recipes],
                      fontsize=9 if len(recipes) > 4 else 10)
        pad = (slots - len(recipes)) / 2
        ax.set_xlim(-0.6 - pad, len(recipes) - 0.4 + pad)
        ax.margins(y=0.15)
        ax.set_ylim(bottom=0)
        ax.grid(axis="x", visible=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if len(lengths) > 1:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside upper center", ncols=len(lengths),
                   frameon=False, title="context length")
    return fig


# the stored column behind each panel key: a panel is drawn when some row has a value there
_SOURCE = {
    "context_prefill_s": "context_prefill_s",
    "decode_ms_per_token": "decode_s_per_token",
    "kv_mib": "kv_bytes",
    "peak_rss_mib": "peak_rss_bytes",
    "token_agreement": "token_agreement",
    "kl": "kl",
}


def speed_section(ctx: ReportContext) -> str:
    parts = []
    panels: list[Panel] = [
        ("context_prefill_s", "context prefill (s per case)", lambda s: s["context_prefill_s"]),
        ("decode_ms_per_token", "decode (ms per generated token)",
         lambda s: s["decode_ms_per_token"]),
        ("kv_mib", "KV cache at answer end (MiB)", lambda s: s["kv_mib"]),
        ("peak_rss_mib", "peak RSS of the process (MiB)", lambda s: s["peak_rss_mib"]),
    ]
    for title, rows in ctx.scoped():
        present = [p for p in panels if any(r.get(_SOURCE[p[0]]) is not None for r in rows)]
        if not present:
            parts.append(subheading(title)
                         + note("No timing or memory measurements in these rows."))
            continue
        fig = _bar_figure(ctx, rows, present, ctx.recipes_in(rows))
        caption = ("Means per recipe (peak RSS: maximum) of each context length. Prefill is the "
                   "time to prefill (and compress) the shared context once per case; decode is "
                   "the decoding time divided by the generated tokens.")
        parts.append(subheading(title)
                     + embed_figure(fig, "speed and memory per recipe", caption))
    return "\n".join(parts)


def fidelity_section(ctx: ReportContext) -> str:
    parts = []
    panels: list[Panel] = [
        ("token_agreement", "token agreement with full (%)",
         lambda s: None if s["token_agreement"] is None else s["token_agreement"] * 100),
        ("kl", "KL(full || recipe) (nats per token)", lambda s: s["kl"]),
    ]
    for title, rows in ctx.scoped():
        others = [r for r in rows if r["recipe"] != FULL]
        present = [p for p in panels if any(r.get(_SOURCE[p[0]]) is not None for r in others)]
        if not present:
            reason = ("no full baseline to compare with" if not any(
                r["recipe"] == FULL for r in rows) else "no recipe besides full")
            if others and any(r["recipe"] == FULL for r in rows):
                reason = "no token agreement or KL was measured"
            parts.append(subheading(title) + note(f"No fidelity numbers: {reason}."))
            continue
        fig = _bar_figure(ctx, others, present, ctx.recipes_in(others))
        caption = ("Token agreement: fraction of answer tokens equal to the full recipe's answer "
                   "(higher is closer). KL: mean KL divergence of full's next-token distribution "
                   "from the recipe's over full's answer (lower is closer).")
        parts.append(subheading(title) + embed_figure(fig, "fidelity to full", caption))
    return "\n".join(parts)
