"""The HTML tables of the report: the summary table and the accuracy tables per task and per
context length.

- :func:`summary_section`: :func:`kvlab.bench.summary.summarize` as an HTML table, with the
  columns (headers, units, formatting) the terminal table uses, and a legend.
- :func:`tasks_section`: recipe x task and recipe x length accuracy tables, cells coloured
  from red (0 %) to green (100 %).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from matplotlib import colormaps
from matplotlib.colors import to_hex, to_rgb

from kvlab.bench.report_context import (
    ReportContext,
    Rows,
    context_lengths,
    escape,
    note,
    subheading,
    tokens,
)
from kvlab.bench.summary import summarize, visible_columns


def summary_section(ctx: ReportContext) -> str:
    summaries = summarize(ctx.rows)
    columns = visible_columns(summaries)
    head = "".join(f"<th class=\"{'num' if c.numeric else 'txt'}\">{escape(c.header)}</th>"
                   for c in columns)
    body = []
    for s in summaries:
        cells = []
        for c in columns:
            style = (f' style="border-left:4px solid {ctx.colours[s["recipe"]]}"'
                     if c.key == "label" else "")
            kind = "num" if c.numeric else "txt" if c.key == "label" else "txt nw"
            cells.append(f'<td class="{kind}"{style}>{escape(c.cell(s))}</td>')
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
    return table + note(legend)


def _cell_colour(accuracy: float) -> str:
    r, g, b = to_rgb(colormaps["RdYlGn"](accuracy))
    mix = 0.55  # towards white, so black text stays readable
    return to_hex((r + (1 - r) * mix, g + (1 - g) * mix, b + (1 - b) * mix))


def _pivot(ctx: ReportContext, rows: Rows, key: str, columns: list[Any],
           header: Callable[[Any], str], corner: str) -> str:
    per = {(s["recipe"], s[key]): s for s in summarize(rows, by=(key,))}
    overall = {s["recipe"]: s for s in summarize(rows)}
    head = f'<th class="txt">{escape(corner)}</th>' + "".join(
        f'<th class="num">{header(c)}</th>' for c in columns) + '<th class="num">all</th>'
    body = []
    for recipe in ctx.recipes_in(rows):
        cells = [f'<td class="txt" style="border-left:4px solid {ctx.colours[recipe]}">'
                 f"{escape(ctx.labels[recipe])}</td>"]
        for s in [per.get((recipe, c)) for c in columns] + [overall.get(recipe)]:
            if s is None or s["accuracy"] is None:
                cells.append('<td class="num">-</td>')
                continue
            title = f'{s["n_cases"]} cases, {s["n_rows"]} rows'
            cells.append(f'<td class="num" style="background:{_cell_colour(s["accuracy"])}" '
                         f'title="{escape(title)}">{s["accuracy"] * 100:.1f}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def tasks_section(ctx: ReportContext) -> str:
    parts = []
    for title, rows in ctx.scoped():
        tasks = list(dict.fromkeys((r["task"], r["family"]) for r in rows))
        families = {t: f for t, f in tasks}
        names = sorted(families, key=lambda t: (str(families[t]), str(t)))
        by_task = _pivot(
            ctx, rows, "task", names,
            lambda t: f'{escape(t)}<br><span class="fam">{escape(families[t])}</span>',
            "accuracy (%)")
        lengths = context_lengths(rows)
        by_length = _pivot(ctx, rows, "target_tokens", lengths,
                           lambda n: f"{escape(tokens(n))}<br><span class=\"fam\">tokens</span>",
                           "accuracy (%)")
        parts.append(
            subheading(title)
            + "<h4>per task</h4>" + by_task
            + "<h4>per context length</h4>" + by_length
            + note("Cells: mean score (%) over cases and turns; colour from red (0 %) to "
                   "green (100 %). 'all' pools every task and length.")
        )
    return "\n".join(parts)
