"""A one-file HTML report of a benchmark directory: tables and plots of the measured results.

:func:`build_report` reads ``DIR/results.duckdb`` and writes ``DIR/report.html``: a single
self-contained page (PNG plots embedded as base64, inline CSS, no JavaScript) with

- a header (models, devices, modes, tasks, lengths, rows, when the report was generated);
- the summary table of :func:`kvlab.bench.summary.summarize`;
- accuracy vs KV memory, with the Pareto frontier (per context length when there are several);
- accuracy per turn, for cases with more than one turn;
- needle heat maps: accuracy on a context length x needle depth grid, one panel per recipe;
- speed and memory bars: context prefill, decode per token, KV memory, peak RSS;
- fidelity to the ``full`` recipe: token agreement and KL;
- accuracy per task and per context length (recipe x task, recipe x length tables).

Every number shown is a measured value or a mean / max of measured values, with its unit.
Plots are drawn on :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no
display needed).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from kvlab.bench.store import DB_NAME, ResultStore
from kvlab.bench.summary import (
    FULL,
    adaptive_number,
    first_seen,
    recipe_labels,
    recipe_order,
    summarize,
    visible_columns,
)
from kvlab.errors import InputError

REPORT_NAME = "report.html"

SECTIONS = {
    "summary": "Summary",
    "pareto": "Accuracy vs KV memory",
    "turns": "Accuracy per turn",
    "needle": "Needle in a haystack: accuracy by length and depth",
    "speed": "Speed and memory",
    "fidelity": "Fidelity to full",
    "tasks": "Accuracy per task and length",
}

_STYLE = {
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
_FULL_COLOUR = "#222222"
_MISSING = "#d9d9d9"

Rows = list[dict[str, Any]]


def build_report(directory: Path | str, output: Path | None = None) -> Path:
    """Write the HTML report of the results in ``directory`` to ``output`` (default
    ``directory/report.html``) and return its path."""
    directory = Path(directory)
    db = directory / DB_NAME
    if not db.exists():
        raise InputError(f"no results store {db}: run `kvlab bench` into {directory} first")
    with ResultStore(directory) as store:
        rows = store.rows()
    if not rows:
        raise InputError(f"{db} holds no results yet: nothing to report")
    output = Path(output) if output is not None else directory / REPORT_NAME
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_report(rows, source=str(db)), encoding="utf-8")
    return output


def render_report(
    rows: Rows, source: str | None = None, generated: dt.datetime | None = None
) -> str:
    """The report page of ``rows`` (as :meth:`ResultStore.rows` returns them), as HTML."""
    if not rows:
        raise InputError("no result rows: nothing to report")
    generated = generated or dt.datetime.now().astimezone()
    ctx = _Context(rows)
    with matplotlib.rc_context(_STYLE):
        body = [
            _header(ctx, source, generated),
            _section("summary", _summary_html(ctx)),
            _section("pareto", _pareto_html(ctx)),
            _section("turns", _turns_html(ctx)),
            _section("needle", _needle_html(ctx)),
            _section("speed", _speed_html(ctx)),
            _section("fidelity", _fidelity_html(ctx)),
            _section("tasks", _tasks_html(ctx)),
        ]
    title = _e(f"kvlab benchmark report: {', '.join(ctx.models)}")
    return (_PAGE_HEAD.replace("@CSS@", _CSS).replace("@TITLE@", title)
            + "\n".join(body) + _PAGE_TAIL)


# --- shared state -------------------------------------------------------------------------

class _Context:
    """The rows plus what every section needs: recipe order, labels, colours, scopes."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows
        self.recipes = recipe_order(rows)
        self.labels = recipe_labels(rows)
        self.models = [str(m) for m in first_seen(rows, "model")]
        self.modes = [str(m) for m in first_seen(rows, "mode")]
        self.lengths = _lengths(rows)
        self.has_full = FULL in self.recipes
        palette = [to_hex(c) for c in colormaps["tab10"].colors if to_hex(c) != "#7f7f7f"]
        others = [r for r in self.recipes if r != FULL]
        self.colours = {r: palette[i % len(palette)] for i, r in enumerate(others)}
        self.colours[FULL] = _FULL_COLOUR
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


# --- HTML pieces --------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _section(key: str, content: str) -> str:
    return f'<section id="{key}">\n<h2>{_e(SECTIONS[key])}</h2>\n{content}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _sub(title: str | None) -> str:
    return f"<h3>{_e(title)}</h3>" if title else ""


def _img(fig: Figure, alt: str, caption: str | None = None) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white")
    width = round(fig.get_figwidth() * 100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}" '
            f'style="width:{width}px">{cap}</figure>')


def _join(values: Iterable[Any]) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values) if values else "-"


def _tokens(n: int | None) -> str:
    """A token count with thousands separators ("-" when the row has none)."""
    return "-" if n is None else f"{n:,}"


def _lengths(rows: Rows) -> list[int | None]:
    """The distinct context lengths (target_tokens), ascending, a missing one last."""
    return sorted({r["target_tokens"] for r in rows}, key=lambda n: (n is None, n or 0))


def _header(ctx: _Context, source: str | None, generated: dt.datetime) -> str:
    rows = ctx.rows
    tasks = list(dict.fromkeys((r["task"], r["family"]) for r in rows))
    devices = first_seen(rows, "device")
    cases = len({(r.get("settings_id"), r["case_id"]) for r in rows})
    written = [r["created_at"] for r in rows if r.get("created_at") is not None]
    items = [
        ("model" if len(ctx.models) == 1 else "models", _join(ctx.models)),
        ("device" if len(devices) == 1 else "devices", _join(devices)),
        ("mode" if len(ctx.modes) == 1 else "modes", _join(ctx.modes)),
        ("recipes", _join(ctx.labels[r] for r in ctx.recipes)),
        *([("recipes in full", "; ".join(f"{ctx.labels[r]} = {r}" for r in ctx.recipes
                                         if ctx.labels[r] != r))]
          if any(ctx.labels[r] != r for r in ctx.recipes) else []),
        ("tasks", _join(f"{t} ({f})" for t, f in tasks)),
        ("context lengths (tokens)", _join(_tokens(n) for n in ctx.lengths)),
        ("results", f"{len(rows):,} rows, {cases:,} cases"),
    ]
    if written:
        first, last = min(written), max(written)
        items.append(("results written", f"{first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M}"))
    items.append(("report generated", f"{generated:%Y-%m-%d %H:%M %Z}".strip()))
    if source:
        items.append(("source", source))
    dl = "\n".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    nav = " · ".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in SECTIONS.items())
    return f"<header><h1>kvlab benchmark report</h1>\n<dl>{dl}</dl>\n<nav>{nav}</nav></header>"


def _summary_html(ctx: _Context) -> str:
    summaries = summarize(ctx.rows)
    columns = visible_columns(summaries)
    head = "".join(f"<th class=\"{'num' if c.numeric else 'txt'}\">{_e(c.header)}</th>"
                   for c in columns)
    body = []
    for s in summaries:
        cells = []
        for c in columns:
            style = (f' style="border-left:4px solid {ctx.colours[s["recipe"]]}"'
                     if c.key == "label" else "")
            kind = "num" if c.numeric else "txt" if c.key == "label" else "txt nw"
            cells.append(f'<td class="{kind}"{style}>{_e(c.cell(s))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    legend = (
        "acc: mean score over all rows (cases x turns). acc per turn: the same for turn 1, 2, ... "
        "KV: bytes the cache held when the answer ended. KV vs full: that size divided by the "
        "full recipe's on the same case and turn. token agree / KL: fidelity of the answer to "
        "the full recipe's (KL(full || recipe) of next-token distributions). prefill: context "
        "prefill (and compression) per case. decode: per generated token. peak RSS: largest "
        "resident memory of the process during a case. '-': not measured or not applicable."
    )
    return table + _note(legend)


# --- accuracy vs KV memory ----------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (less memory ``x``, more
    accuracy ``y``), ordered by ``x``."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


_OFFSETS = [  # (dx, dy) in points, horizontal and vertical alignment
    (9, 5, "left", "bottom"), (9, -5, "left", "top"), (-9, 5, "right", "bottom"),
    (-9, -5, "right", "top"), (0, 10, "center", "bottom"), (0, -10, "center", "top"),
    (9, 18, "left", "bottom"), (9, -18, "left", "top"), (-9, 18, "right", "bottom"),
    (-9, -18, "right", "top"), (0, 26, "center", "bottom"), (0, -26, "center", "top"),
]


def _label_points(
    fig: Figure,
    ax: Any,
    points: list[tuple[float, float, str, str]],
    lines: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
) -> None:
    """Label each (x, y, text, colour) next to its marker, avoiding the other labels, the
    markers and the polylines ``lines`` (data coordinates). Call once the figure's layout is
    final (after ``fig.draw_without_rendering()``): positions are tested in display space."""
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    radius = 5 * fig.dpi / 72
    taken = []
    for x, y, *_ in points:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - radius, py - radius, px + radius, py + radius))
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    for xs, ys in lines:
        path = ax.transData.transform(list(zip(xs, ys)))
        for (x0, y0), (x1, y1) in zip(path[:-1], path[1:]):
            taken.append(Bbox.from_extents(min(x0, x1) - 2, min(y0, y1) - 2,
                                           max(x0, x1) + 2, max(y0, y1) + 2))
    for x, y, text, colour in points:
        chosen = None
        for dx, dy, ha, va in _OFFSETS:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha,
                              va=va, color=colour, fontsize=10)
            ann.set_in_layout(False)
            bb = ann.get_window_extent(renderer)
            inside = (bb.x0 >= box.x0 and bb.x1 <= box.x1 and bb.y0 >= box.y0 and bb.y1 <= box.y1)
            if inside and not any(bb.overlaps(t) for t in taken):
                chosen = bb
                break
            ann.remove()
        if chosen is None:  # crowded: the first place, even if it overlaps something
            dx, dy, ha, va = _OFFSETS[0]
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha,
                              va=va, color=colour, fontsize=10, annotation_clip=False)
            ann.set_in_layout(False)
            chosen = ann.get_window_extent(renderer)
        taken.append(chosen)


def _pareto_html(ctx: _Context) -> str:
    parts = []
    for title, rows in ctx.scoped():
        lengths = _lengths(rows)
        panels: list[tuple[str, Rows]] = [("all lengths", rows)]
        if len(lengths) > 1:
            panels += [(f"{_tokens(n)} tokens", [r for r in rows if r["target_tokens"] == n])
                       for n in lengths]
        else:
            panels = [(f"{_tokens(lengths[0])} tokens", rows)]
        use_ratio = any(r["recipe"] == FULL for r in rows)
        key = "kv_ratio" if use_ratio else "kv_mib"
        xlabel = ("KV memory relative to full (x, 1 = full)" if use_ratio
                  else "KV memory at answer end (MiB)")
        ncols = {1: 1, 3: 3}.get(len(panels), 2)
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(6.5 if ncols == 1 else 12, 4.3 * nrows), layout="constrained")
        fig.get_layout_engine().set(h_pad=0.12, w_pad=0.1)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        missing: set[str] = set()
        to_label = []
        for ax, (name, panel_rows) in zip(axes, panels):
            summaries = summarize(panel_rows)
            pts = [(s[key], s["accuracy"] * 100, s["recipe"]) for s in summaries
                   if s[key] is not None and s["accuracy"] is not None]
            missing |= {s["recipe"] for s in summaries if s[key] is None}
            for x, y, recipe in pts:
                ax.scatter([x], [y], s=70, color=ctx.colours[recipe], zorder=3,
                           edgecolor="white", linewidth=0.8)
            xmax = max([p[0] for p in pts] + [1.0 if use_ratio else 0.0]) * 1.12 or 1.0
            front = pareto_front([(p[0], p[1]) for p in pts])
            staircase: list[tuple[list[float], list[float]]] = []
            if front:
                fx = [pts[i][0] for i in front] + [xmax]
                fy = [pts[i][1] for i in front] + [pts[front[-1]][1]]
                ax.step(fx, fy, where="post", color="#888888", linestyle="--", linewidth=1.3,
                        zorder=2, label="Pareto frontier")
                sx, sy = [fx[0]], [fy[0]]
                for x, y, prev in zip(fx[1:], fy[1:], fy):
                    sx += [x, x]
                    sy += [prev, y]
                staircase.append((sx, sy))
                ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=150,
                           facecolor="none", edgecolor="#555555", linewidth=1.2, zorder=4)
            ax.set_xlim(0, xmax)
            ax.set_ylim(-3, 108)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy (%)")
            ax.set_title(name)
            to_label.append(
                (ax, [(x, y, ctx.labels[r], ctx.colours[r]) for x, y, r in pts], staircase))
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        if any(ax.get_legend_handles_labels()[0] for ax in axes):
            axes[0].legend(loc="lower right", frameon=False)
        FigureCanvasAgg(fig)
        fig.draw_without_rendering()  # final layout, then labels placed in display space
        fig.set_layout_engine("none")  # keep that layout: the labels stay inside the axes
        for ax, points, lines in to_label:
            _label_points(fig, ax, points, lines)
        caption = ("One marker per recipe: mean accuracy over its cases and turns against its "
                   + ("mean KV cache size divided by the full recipe's on the same case and turn. "
                      if use_ratio else "mean KV cache size when the answer ended (no full "
                      "baseline in these results, so sizes are absolute). ")
                   + "The dashed staircase is the Pareto frontier (ringed markers): the best "
                   "accuracy reached with at most that much memory; up and to the left is better.")
        note = ""
        if missing:
            note = _note("Not plotted (no full row on the same cases to compare with): "
                         + ", ".join(ctx.labels[r] for r in ctx.recipes if r in missing))
        parts.append(_sub(title) + _img(fig, "accuracy vs KV memory", caption) + note)
    return "\n".join(parts)


# --- accuracy per turn --------------------------------------------------------------------

def _turns_html(ctx: _Context) -> str:
    parts = []
    for title, rows in ctx.scoped():
        last = {}
        for r in rows:
            key = (r.get("settings_id"), r["case_id"])
            last[key] = max(last.get(key, 0), r["turn"])
        multi = [r for r in rows if last[(r.get("settings_id"), r["case_id"])] > 0]
        if not multi:
            parts.append(_sub(title) + _note(
                "Every case here has a single turn: nothing to plot per turn."))
            continue
        summaries = summarize(multi)
        turns = max(len(s["accuracy_by_turn"]) for s in summaries)
        fig = Figure(figsize=(9.5, 4.2), layout="constrained")
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
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="recipe")
        tasks = ", ".join(dict.fromkeys(r["task"] for r in multi))
        n_cases = len({(r.get("settings_id"), r["case_id"]) for r in multi})
        caption = (f"Mean accuracy at each turn over the {n_cases} cases with more than one turn "
                   f"({tasks}), all context lengths pooled; cases with a single question are "
                   "left out.")
        parts.append(_sub(title) + _img(fig, "accuracy per turn", caption))
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


def _needle_html(ctx: _Context) -> str:
    parts = []
    any_depth = False
    cmap = colormaps["RdYlGn"]
    for title, rows in ctx.scoped():
        drows = [r for r in rows if r["depth"] is not None and r["score"] is not None]
        if not drows:
            continue
        any_depth = True
        recipes = ctx.recipes_in(drows)
        lengths = _lengths(drows)
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
            ax.set_yticks(range(len(lengths)), [_tokens(n) for n in lengths])
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
        parts.append(_sub(title) + _img(fig, "needle heat maps", caption))
    if not any_depth:
        return _note("No needle rows in these results (no row has a depth), so no length x "
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


def _bar_figure(
    ctx: _Context,
    rows: Rows,
    panels: list[tuple[str, str, Callable[[dict[str, Any]], float | None]]],
    recipes: list[str],
) -> Figure:
    """Small multiples of bars, one panel per (key, title with unit, value) and a bar per
    recipe, grouped by context length when there are several."""
    per_length = summarize(rows, by=("target_tokens",))
    lengths = _lengths(per_length)
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
                          label=f"{_tokens(n)} tokens")
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


def _speed_html(ctx: _Context) -> str:
    parts = []
    panels: list[tuple[str, str, Callable[[dict[str, Any]], float | None]]] = [
        ("context_prefill_s", "context prefill (s per case)", lambda s: s["context_prefill_s"]),
        ("decode_ms_per_token", "decode (ms per generated token)",
         lambda s: s["decode_ms_per_token"]),
        ("kv_mib", "KV cache at answer end (MiB)", lambda s: s["kv_mib"]),
        ("peak_rss_mib", "peak RSS of the process (MiB)", lambda s: s["peak_rss_mib"]),
    ]
    for title, rows in ctx.scoped():
        present = [p for p in panels if any(r.get(_SOURCE[p[0]]) is not None for r in rows)]
        if not present:
            parts.append(_sub(title) + _note("No timing or memory measurements in these rows."))
            continue
        fig = _bar_figure(ctx, rows, present, ctx.recipes_in(rows))
        caption = ("Means per recipe (peak RSS: maximum) of each context length. Prefill is the "
                   "time to prefill (and compress) the shared context once per case; decode is "
                   "the decoding time divided by the generated tokens.")
        parts.append(_sub(title) + _img(fig, "speed and memory per recipe", caption))
    return "\n".join(parts)


_SOURCE = {
    "context_prefill_s": "context_prefill_s",
    "decode_ms_per_token": "decode_s_per_token",
    "kv_mib": "kv_bytes",
    "peak_rss_mib": "peak_rss_bytes",
    "token_agreement": "token_agreement",
    "kl": "kl",
}


def _fidelity_html(ctx: _Context) -> str:
    parts = []
    panels: list[tuple[str, str, Callable[[dict[str, Any]], float | None]]] = [
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
            parts.append(_sub(title) + _note(f"No fidelity numbers: {reason}."))
            continue
        fig = _bar_figure(ctx, others, present, ctx.recipes_in(others))
        caption = ("Token agreement: fraction of answer tokens equal to the full recipe's answer "
                   "(higher is closer). KL: mean KL divergence of full's next-token distribution "
                   "from the recipe's over full's answer (lower is closer).")
        parts.append(_sub(title) + _img(fig, "fidelity to full", caption))
    return "\n".join(parts)


# --- tables -------------------------------------------------------------------------------

def _cell_colour(accuracy: float) -> str:
    r, g, b = to_rgb(colormaps["RdYlGn"](accuracy))
    mix = 0.55  # towards white, so black text stays readable
    return to_hex((r + (1 - r) * mix, g + (1 - g) * mix, b + (1 - b) * mix))


def _pivot(ctx: _Context, rows: Rows, key: str, columns: list[Any], header: Callable[[Any], str],
           corner: str) -> str:
    per = {(s["recipe"], s[key]): s for s in summarize(rows, by=(key,))}
    overall = {s["recipe"]: s for s in summarize(rows)}
    head = f'<th class="txt">{_e(corner)}</th>' + "".join(
        f'<th class="num">{header(c)}</th>' for c in columns) + '<th class="num">all</th>'
    body = []
    for recipe in ctx.recipes_in(rows):
        cells = [f'<td class="txt" style="border-left:4px solid {ctx.colours[recipe]}">'
                 f"{_e(ctx.labels[recipe])}</td>"]
        for s in [per.get((recipe, c)) for c in columns] + [overall.get(recipe)]:
            if s is None or s["accuracy"] is None:
                cells.append('<td class="num">-</td>')
                continue
            title = f'{s["n_cases"]} cases, {s["n_rows"]} rows'
            cells.append(f'<td class="num" style="background:{_cell_colour(s["accuracy"])}" '
                         f'title="{_e(title)}">{s["accuracy"] * 100:.1f}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _tasks_html(ctx: _Context) -> str:
    parts = []
    for title, rows in ctx.scoped():
        tasks = list(dict.fromkeys((r["task"], r["family"]) for r in rows))
        families = {t: f for t, f in tasks}
        names = sorted(families, key=lambda t: (str(families[t]), str(t)))
        by_task = _pivot(ctx, rows, "task", names,
                         lambda t: f'{_e(t)}<br><span class="fam">{_e(families[t])}</span>',
                         "accuracy (%)")
        lengths = _lengths(rows)
        by_length = _pivot(ctx, rows, "target_tokens", lengths,
                           lambda n: f"{_e(_tokens(n))}<br><span class=\"fam\">tokens</span>",
                           "accuracy (%)")
        parts.append(
            _sub(title)
            + "<h4>per task</h4>" + by_task
            + "<h4>per context length</h4>" + by_length
            + _note("Cells: mean score (%) over cases and turns; colour from red (0 %) to "
                    "green (100 %). 'all' pools every task and length.")
        )
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       font-size: 15px; color: #222; margin: 24px auto; max-width: 1280px; padding: 0 16px;
       line-height: 1.4; }
h1 { font-size: 26px; margin: 0 0 10px; }
h2 { font-size: 21px; border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 17px; margin: 18px 0 6px; }
h4 { font-size: 15px; margin: 14px 0 4px; color: #444; }
header dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 0; }
header dt { color: #666; }
header dd { margin: 0; }
nav { margin-top: 12px; font-size: 14px; }
nav a { color: #1f5fa8; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e3e3; }
th { background: #f3f3f3; vertical-align: bottom; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num, td.nw { white-space: nowrap; }
td.txt, th.txt { text-align: left; }
span.fam { font-weight: normal; color: #777; font-size: 12px; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 13.5px; max-width: 1000px; margin-top: 4px; }
p.note { color: #555; font-size: 13.5px; max-width: 1000px; }
"""

_PAGE_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>@TITLE@</title>
<style>@CSS@</style>
</head>
<body>
"""
_PAGE_TAIL = """
</body>
</html>
"""


def _two_lines(label: str, width: int = 16) -> str:
    """A long recipe label broken before its parameters, so narrow panel titles don't collide."""
    return label if len(label) <= width else label.replace("(", "\n(", 1)
