"""Accuracy vs KV memory: the report's scatter of recipes with their Pareto frontier.

- :func:`pareto_front`: the points no other point beats on both memory and accuracy.
- :func:`pareto_section`: one panel per context length (and all lengths pooled), memory
  relative to ``full`` when the results have it (absolute MiB otherwise), the frontier drawn
  as a staircase and each marker labelled away from the other labels, markers and lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from kvlab.bench.plots import embed_figure
from kvlab.bench.report_context import (
    ReportContext,
    Rows,
    context_lengths,
    note,
    subheading,
    tokens,
)
from kvlab.bench.summary import FULL, summarize


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


def pareto_section(ctx: ReportContext) -> str:
    parts = []
    for title, rows in ctx.scoped():
        lengths = context_lengths(rows)
        panels: list[tuple[str, Rows]] = [("all lengths", rows)]
        if len(lengths) > 1:
            panels += [(f"{tokens(n)} tokens", [r for r in rows if r["target_tokens"] == n])
                       for n in lengths]
        else:
            panels = [(f"{tokens(lengths[0])} tokens", rows)]
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
        not_plotted = ""
        if missing:
            not_plotted = note("Not plotted (no full row on the same cases to compare with): "
                               + ", ".join(ctx.labels[r] for r in ctx.recipes if r in missing))
        parts.append(subheading(title) + embed_figure(fig, "accuracy vs KV memory", caption)
                     + not_plotted)
    return "\n".join(parts)
