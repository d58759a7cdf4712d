"""Accuracy vs KV memory: the report's scatter of recipes with their Pareto frontier.

- :func:`pareto_front`: the points no other point beats on both memory and accuracy.
- :func:`pareto_figure` / :func:`pareto_section`: one panel per context length (and all
  lengths pooled), memory relative to ``full`` when the results have it (absolute MiB
  otherwise), 95 % Wilson intervals on accuracy, the frontier drawn as a staircase, the
  recipes named in a legend beside the panels (colour and marker per recipe, one hue per
  method family), so no label can sit on a marker or leave the plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.transforms import ScaledTranslation

from kvlab.bench.plots import embed_figure, legend_label
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


def _power_label(value: float, ratio: bool) -> str:
    """A power of two as a tick: 1/8, 1/2, 1, 2 (ratios), or 0.5, 8, 64 (MiB)."""
    if ratio and value < 1:
        return f"1/{round(1 / value)}"
    return f"{value:g}"


DODGE_PT = 9.0
"""Horizontal distance (points) between markers that would sit on the same spot."""


def _dodge(points: list[tuple[float, float]]) -> list[float]:
    """Horizontal offsets in points that set side by side the markers closer than about a
    marker's width (``points`` as fractions of the axes: x / x range, accuracy 0..1), so no
    recipe hides another; the values stay as measured, only the drawing moves."""
    offsets = [0.0] * len(points)
    groups: list[list[int]] = []
    for i, (x, y) in enumerate(points):
        for group in groups:
            gx, gy = points[group[0]]
            if abs(gx - x) < 0.02 and abs(gy - y) < 0.03:
                group.append(i)
                break
        else:
            groups.append([i])
    for group in groups:
        for k, i in enumerate(group):
            offsets[i] = (k - (len(group) - 1) / 2) * DODGE_PT
    return offsets


def pareto_panels(rows: Rows) -> list[tuple[str, Rows]]:
    """(title, rows) of each panel: every context length and, with several, all pooled."""
    lengths = context_lengths(rows)
    if len(lengths) == 1:
        return [(f"{tokens(lengths[0])} tokens", rows)]
    return [("all lengths", rows)] + [
        (f"{tokens(n)} tokens", [r for r in rows if r["target_tokens"] == n]) for n in lengths]


def pareto_figure(ctx: ReportContext, rows: Rows) -> tuple[Figure, set[str]]:
    """The accuracy vs KV memory figure of ``rows`` and the recipes left out (no memory
    value to place them by). Markers carry 95 % Wilson intervals; the recipes of one method
    family are joined by a thin line (their budget sweep); the legend is beside the panels,
    so no label sits on a marker."""
    panels = pareto_panels(rows)
    use_ratio = any(r["recipe"] == FULL for r in rows)
    key = "kv_ratio" if use_ratio else "kv_mib"
    xlabel = ("KV memory relative to full (x, 1 = full; log scale)" if use_ratio
              else "KV memory at answer end (MiB, log scale)")
    recipes = ctx.recipes_in(rows)
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    legend_rows = sum(legend_label(ctx.labels[r]).count("\n") + 1 for r in recipes) + 2
    height = max(4.3 * nrows, 0.2 * legend_rows + 0.8)
    fig = Figure(figsize=((7.5 if ncols == 1 else 6.0 * ncols) + 3.4, height),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    missing: set[str] = set()
    handles: dict[str, Any] = {}
    for ax, (name, panel_rows) in zip(axes, panels):
        summaries = summarize(panel_rows)
        pts = [s for s in summaries if s[key] is not None and s["accuracy"] is not None]
        missing |= {s["recipe"] for s in summaries if s[key] is None}
        # memory on a log2 scale: a budget sweep (1/2, 1/4, 1/8, ...) is evenly spaced
        xs = [s[key] for s in pts if s[key] > 0] or [1.0]
        xmin, xmax = min(xs + ([1.0] if use_ratio else [])) / 1.35, max(xs + ([1.0] if use_ratio else [])) * 1.35
        families: dict[str, list[dict[str, Any]]] = {}
        for s in pts:
            families.setdefault(ctx.families[s["recipe"]], []).append(s)
        for members in families.values():
            if len(members) > 1:
                members = sorted(members, key=lambda s: s[key])
                ax.plot([s[key] for s in members], [s["accuracy"] * 100 for s in members],
                        color=ctx.colours[members[0]["recipe"]], linewidth=1, alpha=0.5,
                        zorder=2)
        span = math.log2(xmax / xmin)
        spots = [(math.log2(max(s[key], xmin) / xmin) / span, s["accuracy"]) for s in pts]
        for s, dx in zip(pts, _dodge(spots)):
            y = s["accuracy"] * 100
            low, high = (v * 100 for v in s["accuracy_ci"])
            shift = ax.transData + ScaledTranslation(dx / 72, 0, fig.dpi_scale_trans)
            colour = ctx.colours[s["recipe"]]
            ax.plot([s[key]] * 2, [low, high], color=colour, linewidth=1, alpha=0.45,
                    transform=shift, zorder=3)
            ax.plot([s[key]] * 2, [low, high], linestyle="none", marker="_", markersize=6,
                    color=colour, alpha=0.45, transform=shift, zorder=3)
            handle, = ax.plot([s[key]], [y], linestyle="none", marker=ctx.markers[s["recipe"]],
                              markersize=8, color=colour, markeredgecolor="white",
                              markeredgewidth=0.8, transform=shift, zorder=4)
            handles.setdefault(s["recipe"], handle)
        front = pareto_front([(s[key], s["accuracy"] * 100) for s in pts])
        if front:
            fx = [pts[i][key] for i in front] + [xmax]
            fy = [pts[i]["accuracy"] * 100 for i in front]
            fy.append(fy[-1])
            step, = ax.step(fx, fy, where="post", color="#888888", linestyle="--",
                            linewidth=1.3, zorder=1)
            handles.setdefault("\0frontier", step)
        ax.set_xscale("log", base=2)
        ax.set_xlim(xmin, xmax)
        ticks = [2.0 ** k for k in range(math.floor(math.log2(xmin)), math.ceil(math.log2(xmax)) + 1)
                 if xmin <= 2.0 ** k <= xmax]
        ax.set_xticks(ticks, [_power_label(t, use_ratio) for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(-5, 108)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        n = min((s["n_scored"] for s in summaries), default=0)
        ax.set_title(f"{name} (n = {n} per recipe)" if len({s["n_scored"] for s in summaries}) == 1
                     else f"{name} (n >= {n} per recipe)")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    order = [r for r in recipes if r in handles] + (["\0frontier"] if "\0frontier" in handles else [])
    names = [legend_label(ctx.labels[r]) if r in ctx.labels else "Pareto frontier" for r in order]
    fig.legend([handles[r] for r in order], names, loc="outside right upper", frameon=False,
               title="recipe", fontsize=9, title_fontsize=10, handlelength=1.6,
               labelspacing=0.5)
    return fig, missing


def pareto_section(ctx: ReportContext) -> str:
    parts = []
    for title, rows in ctx.scoped():
        fig, missing = pareto_figure(ctx, rows)
        use_ratio = any(r["recipe"] == FULL for r in rows)
        caption = ("One marker per recipe: mean accuracy over its cases and turns (bars: 95 % "
                   "Wilson interval over the n scored answers) against its "
                   + ("mean KV cache size divided by the full recipe's on the same case and turn. "
                      if use_ratio else "mean KV cache size when the answer ended (no full "
                      "baseline in these results, so sizes are absolute). ")
                   + "A thin line joins the settings of one method (its budget sweep); markers "
                   "that would sit on the same spot are set side by side. The "
                   "dashed staircase is the Pareto frontier: the best accuracy reached with at "
                   "most that much memory; up and to the left is better.")
        not_plotted = ""
        if missing:
            not_plotted = note("Not plotted (no full row on the same cases to compare with): "
                               + ", ".join(ctx.labels[r] for r in ctx.recipes if r in missing))
        parts.append(subheading(title) + embed_figure(fig, "accuracy vs KV memory", caption)
                     + not_plotted)
    return "\n".join(parts)
