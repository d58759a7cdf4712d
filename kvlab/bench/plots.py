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
from matplotlib.text import Text

from kvlab.bench.report_context import (
    ReportContext,
    Rows,
    context_lengths,
    escape,
    note,
    subheading,
    tokens,
)
from kvlab.bench.summary import FULL, adaptive_number, summarize, wilson_interval

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


def text_problems(fig: Figure) -> list[str]:
    """What is wrong with the placement of the figure's text: each pair of visible, non-empty
    texts (tick labels, titles, bar values, legend entries, annotations) whose boxes overlap,
    and each text that runs past the figure's edge, measured in display space once the figure
    is drawn. Empty when every label is readable (the report's plots are tested with it)."""
    FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    ticks, drawn_ticks = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) * 1e-6
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                labels = (tick.label1, tick.label2)
                ticks.update(id(t) for t in labels)
                if ax.get_visible() and low - span <= tick.get_loc() <= high + span:
                    drawn_ticks += [t for t in labels if t.get_visible()]
    boxes = []
    for text in [t for t in fig.findobj(Text) if id(t) not in ticks] + drawn_ticks:
        if not text.get_visible() or not text.get_text().strip():
            continue
        if text.axes is not None and not text.axes.get_visible():
            continue
        box = text.get_window_extent(renderer)
        if box.width <= 0 or box.height <= 0:
            continue
        boxes.append((text.get_text().replace("\n", " "), box.shrunk(0.97, 0.9)))
    problems = []
    for name, box in boxes:
        if box.x0 < page.x0 - 1 or box.x1 > page.x1 + 1 or box.y0 < page.y0 - 1 or box.y1 > page.y1 + 1:
            problems.append(f"{name!r} runs off the figure")
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            if box_a.overlaps(box_b):
                problems.append(f"{a!r} overlaps {b!r}")
    return problems


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




# --- accuracy per turn --------------------------------------------------------------------

def multi_turn_rows(rows: Rows) -> Rows:
    """The rows of cases with more than one turn (what "acc per turn" is computed on)."""
    last: dict[tuple[Any, Any], int] = {}
    for r in rows:
        key = (r.get("settings_id"), r["case_id"])
        last[key] = max(last.get(key, 0), r["turn"])
    return [r for r in rows if last[(r.get("settings_id"), r["case_id"])] > 0]


def short_label(label: str, family: str) -> str:
    """A recipe's label inside its family's panel: the parameters only when the family is one
    method (``snapkv(budget=0.5)`` -> ``budget=0.5``), else the whole label."""
    if "+" not in family and label.startswith(family + "(") and label.endswith(")"):
        return label[len(family) + 1:-1] or label
    return label


def turns_figure(ctx: ReportContext, rows: Rows) -> Figure | None:
    """Accuracy per turn from :func:`summarize`'s ``accuracy_by_turn`` (the summary table's
    numbers), with 95 % Wilson intervals: one panel per method family (its settings in shades,
    ``full`` dashed in every panel as the reference); ``None`` without multi-turn cases."""
    summaries = [s for s in summarize(rows) if any(v is not None for v in s["accuracy_by_turn"])]
    if not summaries:
        return None
    turns = max(len(s["accuracy_by_turn"]) for s in summaries)
    full = [s for s in summaries if s["recipe"] == FULL]
    families: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        if s["recipe"] != FULL:
            families.setdefault(ctx.families[s["recipe"]], []).append(s)
    panels = list(families.items()) or [(FULL, [])]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    most = max(len(m) for _, m in panels) + len(full)
    fig = Figure(figsize=(4.2 * ncols, (3.0 + 0.2 * most) * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (family, members) in zip(axes, panels):
        shown = full + members
        spread = 0.24 / max(1, len(shown) - 1)  # side by side, so equal values stay visible
        for i, s in enumerate(shown):
            xs, ys, low, high = [], [], [], []
            for t, (v, n) in enumerate(zip(s["accuracy_by_turn"], s["accuracy_by_turn_n"])):
                if v is None:
                    continue
                lo, hi = wilson_interval(v, n)
                xs.append(t + 1 + (i * spread - 0.12 if len(shown) > 1 else 0.0))
                ys.append(v * 100)
                low.append(max(0.0, v * 100 - lo * 100))
                high.append(max(0.0, hi * 100 - v * 100))
            is_full = s["recipe"] == FULL
            drawn = ax.errorbar(xs, ys, yerr=[low, high], marker=ctx.markers[s["recipe"]],
                        linewidth=1.8, markersize=6, elinewidth=0.8, capsize=2,
                        color=ctx.colours[s["recipe"]], linestyle="--" if is_full else "-",
                        zorder=4 if is_full else 3,
                        label=s["label"] if is_full else short_label(s["label"], family))
            drawn.lines[0].set_gid(s["recipe"])  # which recipe a line is (tests read it)
        ax.set_xticks(range(1, turns + 1))
        ax.set_xlim(0.6, turns + 0.4)
        ax.set_ylim(-5, 108)
        ax.set_title(family, color=ctx.colours[members[0]["recipe"]] if members else None)
        ax.set_xlabel("turn")
        ax.set_ylabel("accuracy (%)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False,
                  fontsize="small", ncols=1)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def turns_section(ctx: ReportContext) -> str:
    parts = []
    for title, rows in ctx.scoped():
        multi = multi_turn_rows(rows)
        fig = turns_figure(ctx, rows)
        if fig is None:
            parts.append(subheading(title) + note(
                "Every case here has a single turn: nothing to plot per turn."))
            continue
        tasks = ", ".join(dict.fromkeys(r["task"] for r in multi))
        n_cases = len({(r.get("settings_id"), r["case_id"]) for r in multi})
        caption = (f"Mean accuracy at each turn (1 = first question on the context) over the "
                   f"{n_cases} cases with more than one turn ({tasks}), all context lengths "
                   "pooled: the 'acc per turn' column of the summary; bars: 95 % Wilson "
                   "intervals. One panel per method, full dashed in each. Cases with a single "
                   "question are left out. Markers of one turn are set side by side so equal "
                   "values stay visible.")
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


def legend_label(label: str, width: int = 30) -> str:
    """A recipe label on lines of at most ``width`` characters, broken after commas and
    before ``+`` (legend entries beside a plot)."""
    lines, line = [], ""
    for word in label.replace(" + ", " +").split(" "):
        word = word.replace("+", "+ ", 1) if word.startswith("+") else word
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "  " + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)


def needle_rows(rows: Rows) -> Rows:
    return [r for r in rows if r["depth"] is not None and r["score"] is not None]


def needle_figure(ctx: ReportContext, drows: Rows) -> Figure:
    """Heat maps of accuracy on context length x needle depth, one panel per recipe."""
    cmap = colormaps["RdYlGn"]
    recipes = ctx.recipes_in(drows)
    lengths = context_lengths(drows)
    labels, column = _depth_bins([r["depth"] for r in drows])
    panel_w = max(0.48 * len(labels) + 1.3, 2.4)
    most = max(1, min(len(recipes), int(12.5 // panel_w)))
    nrows = math.ceil(len(recipes) / most)
    ncols = math.ceil(len(recipes) / nrows)  # balanced: 2 x 2 rather than 3 + 1
    panel_h = 0.42 * len(lengths) + 1.6
    fig = Figure(figsize=(min(12.5, panel_w * ncols + 1.2), panel_h * nrows + 0.4),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    image = None
    for k, (ax, recipe) in enumerate(zip(axes, recipes)):
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
                ax.text(j, i, text, ha="center", va="center", fontsize=9, color=colour)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(lengths)), [tokens(n) for n in lengths])
        if k + ncols >= len(recipes):  # the bottom panel of its column
            ax.set_xlabel("needle depth (%)")
        if k % ncols == 0:
            ax.set_ylabel("context (tokens)")
        ax.set_title(legend_label(ctx.labels[recipe], 22), color="#333333", fontsize=9)
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
    for ax in axes[len(recipes):]:
        ax.set_visible(False)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes[:len(recipes)]), shrink=0.9, pad=0.02)
        bar.set_label("accuracy (%)")
    return fig


def needle_section(ctx: ReportContext) -> str:
    parts = []
    any_depth = False
    for title, rows in ctx.scoped():
        drows = needle_rows(rows)
        if not drows:
            continue
        any_depth = True
        fig = needle_figure(ctx, drows)
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

def _wrap(label: str, width: int = 22) -> str:
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
    """Small multiples of horizontal bars, one panel per (key, title with unit, value) and a
    row per recipe (named once, on the left), a bar per context length when there are several.
    Every bar carries its value at its end: one bar per line of text, so labels cannot
    collide."""
    per_length = summarize(rows, by=("target_tokens",))
    lengths = context_lengths(per_length)
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    wrapped = {r: _wrap(ctx.labels[r]) for r in recipes}
    row_in = [max(0.2 * len(lengths) + 0.1, 0.17 * (wrapped[r].count("\n") + 1) + 0.08)
              for r in recipes]
    panel_h = sum(row_in) + 0.9
    longest = max((len(line) for r in recipes for line in wrapped[r].split("\n")), default=8)
    fig = Figure(figsize=(min(13.0, 4.3 * ncols + 0.075 * longest + 0.5),
                          panel_h * nrows + (0.5 if len(lengths) > 1 else 0)),
                 layout="constrained")
    fig.get_layout_engine().set(h_pad=0.2)  # room between a panel's ticks and the next title
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    shades = colormaps["Blues"]
    centres, pos = [], 0.0
    for h in row_in:  # each row as tall as its label needs (in inches, as data units)
        centres.append(pos + h / 2)
        pos += h
    bar_h = (min(row_in) - 0.08) / len(lengths)  # one bar height everywhere
    for ax, (_, title, value) in zip(axes, panels):
        top = 0.0
        for j, n in enumerate(lengths):
            ys, xs, colours = [], [], []
            for i, recipe in enumerate(recipes):
                s = next((s for s in per_length
                          if s["recipe"] == recipe and s["target_tokens"] == n), None)
                v = value(s) if s is not None else None
                if v is None:
                    continue
                ys.append(centres[i] + bar_h * (j + 0.5 - len(lengths) / 2))
                xs.append(v)
                colours.append(ctx.colours[recipe] if len(lengths) == 1
                               else shades(0.35 + 0.6 * j / max(1, len(lengths) - 1)))
            bars = ax.barh(ys, xs, height=bar_h * 0.88, color=colours,
                           label=f"{tokens(n)} tokens")
            if ys:
                ax.bar_label(bars, labels=[adaptive_number(v) for v in xs], padding=3,
                             fontsize=8 if len(lengths) > 1 else 9)
                top = max(top, max(xs))
        ax.set_title(title)
        ax.set_yticks(centres, [wrapped[r] for r in recipes], fontsize=9)
        ax.set_ylim(pos, 0)  # first recipe on top
        ax.set_xlim(0, (top or 1.0) * 1.22)  # room for the value labels
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0)
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
