"""The report's "Perplexity by position" section, from the store's ``perplexity`` rows
(``kvlab ppl``, :mod:`kvlab.bench.perplexity`).

Per model and document length: a figure with one curve per recipe (perplexity of each
position bin against the bin's position, log scale, the model's window as a dashed line) and a
table of the targets of issue 11: the perplexity over the last bin, over a bin inside the
window (the last bin that ends at or before the window, where the model reads the most context
it was trained for), their ratio, and the time the document took.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from kvlab.bench.lengths import format_length
from kvlab.bench.report_context import Rows, escape, note, recipe_styles, subheading

PPL_SECTION = ("perplexity", "Perplexity by position")
"""The section of ``kvlab ppl``'s rows: on the page only when the store has some."""


def documents(rows: Rows) -> list[tuple[tuple[str, int], dict[str, Rows]]]:
    """((model, length), {recipe label: bin rows in position order}), lengths ascending."""
    out: dict[tuple[str, int], dict[str, Rows]] = {}
    for row in rows:
        key = (str(row["model"]), int(row["length"]))
        out.setdefault(key, {}).setdefault(str(row["recipe_label"]), []).append(row)
    for recipes in out.values():
        for bins in recipes.values():
            bins.sort(key=lambda r: r["bin_start"])
    return sorted(out.items(), key=lambda item: (item[0][1], item[0][0]))


def summary(bins: Rows, trained: int) -> dict[str, Any]:
    """The last bin's perplexity, the reference bin inside the window (the last bin ending at
    or before ``trained``), the perplexity over every bin inside the window (the bins' content
    differs: prose is not equally predictable everywhere) and the ratios of the last bin's to
    both."""
    inside = [r for r in bins if r["bin_end"] <= trained]
    last = bins[-1]
    ref = inside[-1] if inside else None
    out = {
        "last": last["perplexity"], "last_bin": (last["bin_start"], last["bin_end"]),
        "inside": ref["perplexity"] if ref else None,
        "inside_bin": (ref["bin_start"], ref["bin_end"]) if ref else None,
        "ratio": last["perplexity"] / ref["perplexity"] if ref else None,
        "window_ppl": math.exp(sum(r["nll_sum"] for r in inside) / sum(r["tokens"] for r in inside))
        if inside else None,
        "mean_nll": sum(r["nll_sum"] for r in bins) / sum(r["tokens"] for r in bins),
        "seconds": last["seconds"], "load": last["load_average"], "threads": last["threads"],
    }
    out["window_ratio"] = out["last"] / out["window_ppl"] if out["window_ppl"] else None
    return out


def trained_window(rows: Rows) -> int:
    """The model's window: the ``context_window`` of the rows of ``full`` when present, else
    the smallest window of any row (give it every row of the model, all lengths: a 32k
    document run only with a 4x extension still has its bins compared with the model's own
    window, measured on a shorter document)."""
    full = [r for r in rows if r["recipe"] == "full"]
    return int(min(r["context_window"] for r in (full or rows)))


def _minor_tick(value: float, _: object) -> str:
    """Plain labels (20, 30, 50 rather than 2x10^1) on the log axis' 2s, 3s and 5s only."""
    leading = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if leading in (2, 3, 5) else ""


def ppl_figure(recipes: dict[str, Rows], length: int, trained: int) -> Figure:
    """Perplexity per bin against position, one curve per recipe, log y."""
    names = list(recipes)
    colours, markers = recipe_styles(names)
    fig = Figure(figsize=(11, 5.4), layout="constrained")
    ax = fig.subplots()
    for name in names:
        bins = recipes[name]
        x = [(r["bin_start"] + r["bin_end"]) / 2 / 1024 for r in bins]
        ax.plot(x, [r["perplexity"] for r in bins], marker=markers[name], color=colours[name],
                label=name, linewidth=2.2 if name == "full" else 1.5, markersize=4)
    if trained < length:
        ax.axvline(trained / 1024, linestyle="--", color="#888888", linewidth=1)
        ax.text(trained / 1024, 0.97, f" window {format_length(trained)}", color="#555555",
                transform=ax.get_xaxis_transform(), fontsize=10, va="top")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(_minor_tick))
    ax.set_xlabel("position of the bin's centre (k tokens)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"Perplexity by position, {format_length(length)}-token document")
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside right center", fontsize=9, frameon=False)
    return fig


def _cell(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _table(recipes: dict[str, Rows], trained: int) -> str:
    head = ("<tr><th class='txt'>recipe</th><th class='num'>window (tokens)</th>"
            "<th class='num'>ppl, last bin in the window</th><th class='num'>ppl, whole window</th>"
            "<th class='num'>ppl, last bin</th><th class='num'>last / in-window bin</th>"
            "<th class='num'>last / whole window</th><th class='num'>mean NLL (nats/token)</th>"
            "<th class='num'>time (s)</th><th class='num'>load</th></tr>")
    body = []
    for name, bins in recipes.items():
        s = summary(bins, trained)
        cells = [f"{int(bins[0]['context_window']):,}", _cell(s["inside"]), _cell(s["window_ppl"]),
                 _cell(s["last"]), _cell(s["ratio"], "{:.2f}x"), _cell(s["window_ratio"], "{:.2f}x"),
                 _cell(s["mean_nll"], "{:.3f}"),
                 f"{s['seconds']:.0f}", f"{s['load']:.1f}"]
        body.append(f"<tr><td class='txt'><code>{escape(name)}</code></td>"
                    + "".join(f"<td class='num'>{escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table class='ppl'>{head}{''.join(body)}</table>"


CAPTION = (
    "Token-level perplexity of the shipped public-domain prose (Pride and Prejudice), "
    "teacher-forced chunk by chunk through each recipe, per position bin. The document but its "
    "last bin is the recipe's context (a compress method compresses it after its last chunk); "
    "the last bin is appended to that cache and scored there. Dashed: the model's trained window."
)


def ppl_section(rows: Rows) -> str:
    """The report's "Perplexity by position" section: per (model, length) a figure and a table."""
    from kvlab.bench.plots import embed_figure

    parts = []
    docs = documents(rows)
    models = {model for (model, _), _ in docs}
    for (model, length), recipes in docs:
        mine = [r for bins in recipes.values() for r in bins]
        trained = trained_window([r for r in rows if r["model"] == model])
        title = f"{format_length(length)} tokens" + (f", {model}" if len(models) > 1 else "")
        parts.append(subheading(title))
        inside = summary(next(iter(recipes.values())), trained)["inside_bin"]
        where = (f"bin {inside[0]:,}-{inside[1]:,}" if inside else "none (the window holds no bin)")
        first = mine[0]
        parts.append(note(
            f"{model}, {first['dtype']} on {first['device']}, {first['threads']} torch thread(s); "
            f"{len(recipes)} recipe(s), bins of {first['bin_end'] - first['bin_start']} tokens "
            f"from token {first['doc_start']:,} of the corpus; window {trained:,} tokens; "
            f"the in-window reference is the last bin inside the window: {where}."
        ))
        parts.append(embed_figure(ppl_figure(recipes, length, trained),
                                  f"perplexity by position at {format_length(length)}", CAPTION))
        parts.append(_table(recipes, trained))
    return "\n".join(parts)


__all__ = ["PPL_SECTION", "documents", "ppl_figure", "ppl_section", "summary", "trained_window"]
