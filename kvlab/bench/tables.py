"""The HTML tables of the report: the summary table and the accuracy tables per task and per
context length.

- :func:`summary_section`: :func:`kvlab.bench.summary.summarize` as an HTML table, with the
  columns (headers, units, formatting) the terminal table uses, and a legend.
- :func:`tasks_section`: recipe x task and recipe x length accuracy tables, cells coloured
  from red (0 %) to green (100 %).
- :func:`cases_section`: every answer next to its gold answers, one collapsible table per
  recipe (HTML ``<details>``: no script needed).
- :func:`run_section`: the settings and versions each set of results was measured with.
"""

from __future__ import annotations

import json
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
        "acc: mean score over all rows (cases x turns). 95% CI: the Wilson interval of acc over "
        "the n scored rows (wide when n is small). acc per turn: the mean score at turn 1, 2, ... "
        "over the cases with more than one turn (the per-turn plot's numbers). "
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
            low, high = s["accuracy_ci"]
            title = (f'{s["n_cases"]} cases, {s["n_rows"]} rows; 95 % Wilson interval '
                     f'{low * 100:.0f}-{high * 100:.0f} %')
            cells.append(f'<td class="num" style="background:{_cell_colour(s["accuracy"])}" '
                         f'title="{escape(title)}">{s["accuracy"] * 100:.1f}'
                         f'<span class="n"> n={s["n_scored"]}</span></td>')
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
            + note("Cells: mean score (%) over cases and turns, n = scored answers (hover a "
                   "cell for its 95 % Wilson interval); colour from red (0 %) to green (100 %). "
                   "'all' pools every task and length.")
        )
    return "\n".join(parts)


CASE_ROWS = 500
"""Most answers listed per recipe (the page stays small; the store holds them all)."""


def _gold(text: Any) -> str:
    try:
        answers = json.loads(text)
    except (TypeError, ValueError):
        return str(text)
    return " | ".join(str(a) for a in answers) if isinstance(answers, list) else str(answers)


def cases_section(ctx: ReportContext) -> str:
    """Per recipe, a collapsed table of every answer: case, length, depth, turn, question, gold
    answers, the prediction, its score. Everything escaped."""
    parts = []
    for title, rows in ctx.scoped():
        blocks = []
        for k, recipe in enumerate(ctx.recipes_in(rows)):
            mine = sorted((r for r in rows if r["recipe"] == recipe),
                          key=lambda r: (str(r["task"]), r["target_tokens"] or 0,
                                         r["depth"] if r["depth"] is not None else -1,
                                         str(r["case_id"]), r["turn"]))
            scored = [r["score"] for r in mine if r["score"] is not None]
            right = sum(1 for v in scored if v >= 1.0)
            body = []
            for r in mine[:CASE_ROWS]:
                score = r["score"]
                mark = "-" if score is None else f"{score:.2f}".rstrip("0").rstrip(".")
                kind = "" if score is None else ' class="ok"' if score >= 1.0 else \
                    ' class="bad"' if score <= 0.0 else ' class="part"'
                depth = "-" if r["depth"] is None else f'{r["depth"] * 100:.0f}'
                body.append(
                    f"<tr><td class=\"txt nw\">{escape(r['case_id'])}</td>"
                    f"<td class=\"num\">{escape(tokens(r['target_tokens']))}</td>"
                    f"<td class=\"num\">{depth}</td><td class=\"num\">{r['turn'] + 1}</td>"
                    f"<td class=\"txt q\">{escape(r['question'])}</td>"
                    f"<td class=\"txt a\">{escape(_gold(r['gold']))}</td>"
                    f"<td class=\"txt a\">{escape(r['prediction'])}</td>"
                    f"<td class=\"num\"{kind}>{mark}</td></tr>")
            more = (f'<p class="note">First {CASE_ROWS} of {len(mine)} answers shown.</p>'
                    if len(mine) > CASE_ROWS else "")
            head = ("<tr><th class=\"txt\">case</th><th class=\"num\">context (tokens)</th>"
                    "<th class=\"num\">depth (%)</th><th class=\"num\">turn</th>"
                    "<th class=\"txt\">question</th><th class=\"txt\">gold</th>"
                    "<th class=\"txt\">prediction</th><th class=\"num\">score</th></tr>")
            summary = (f'<summary><span class="swatch" style="background:{ctx.colours[recipe]}">'
                       f"</span>{escape(ctx.labels[recipe])}: {right} of {len(scored)} answers "
                       f"fully right</summary>")
            opened = " open" if k == 0 else ""  # the first shows what the tables hold
            blocks.append(f'<details class="cases"{opened}>{summary}<table class="cases"><thead>{head}'
                          f"</thead><tbody>{''.join(body)}</tbody></table>{more}</details>")
        parts.append(subheading(title) + "".join(blocks))
    return ("\n".join(parts)
            + note("Click a recipe to open or close its answers. Gold: the accepted answers (any one, or "
                   "all for multi-value tasks, as the metric says); score: the task's metric, "
                   "1 = right."))


# (key in the run details, label shown)
RUN_FIELDS = (
    ("model", "model"), ("model_path", "model file"), ("device", "device"),
    ("dtype", "dtype"), ("seed", "seed"), ("mode", "mode"), ("tasks", "tasks"),
    ("lengths", "context lengths (tokens)"), ("samples", "samples per task and length"),
    ("depths", "needle depths"), ("data", "data files"), ("max_new_tokens", "max new tokens"),
    ("reference", "reference recipe"), ("raw_prompt", "prompt form"),
    ("prompt_form", "prompt form"), ("allow_overflow", "allow overflow"),
    ("recipes", "recipes"), ("versions", "versions"), ("machine", "machine"),
    ("torch_threads", "torch threads"), ("started", "started"), ("finished", "finished"),
    ("wall_s", "wall time (model load and every pair)"),
    ("load_average_start", "load average at start (1, 5, 15 min)"),
    ("load_average", "load average at end (1, 5, 15 min)"),
)


def _run_value(key: str, value: Any) -> str:
    if value is None or value == [] or value == "":
        return "default" if key in ("max_new_tokens",) else "-"
    if key == "raw_prompt":
        return "raw (as the data file sends it)" if value else "chat template"
    if key == "wall_s":
        minutes, seconds = divmod(float(value), 60)
        return f"{int(minutes)} min {seconds:.0f} s ({float(value):,.0f} s)"
    if key == "lengths":
        return ", ".join(tokens(int(v)) for v in value)
    if key == "depths":
        return ", ".join(f"{float(v) * 100:g} %" for v in value)
    if key in ("load_average", "load_average_start"):
        return ", ".join(f"{float(v):.2f}" for v in value)
    if key == "recipes":
        return "; ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def run_section(ctx: ReportContext, details: dict[str, dict[str, Any]]) -> str:
    """A table per settings id of the results: what ``kvlab bench`` recorded in ``run.json``
    (settings, versions, machine, wall time); what the rows alone tell otherwise."""
    settings = list(dict.fromkeys(r.get("settings_id") for r in ctx.rows))
    parts = []
    for sid in settings:
        rows = [r for r in ctx.rows if r.get("settings_id") == sid]
        record = dict(details.get(str(sid), {}))
        record.setdefault("model", rows[0]["model"])
        record.setdefault("device", rows[0].get("device"))
        record.setdefault("mode", rows[0]["mode"])
        shown = [(label, _run_value(key, record[key])) for key, label in RUN_FIELDS
                 if key in record]
        known = {k for k, _ in RUN_FIELDS} | {"out", "settings_id", "config"}
        shown += [(key, _run_value(key, value)) for key, value in record.items()
                  if key not in known]
        body = "".join(f'<tr><th class="txt">{escape(k)}</th><td class="txt">{escape(v)}</td></tr>'
                       for k, v in shown)
        missing = "" if str(sid) in details else note(
            "No run.json for these results (written by an older kvlab or elsewhere): only what "
            "the rows themselves hold is shown.")
        n_rows = len(rows)
        parts.append(f"<h3>settings {escape(sid)} ({n_rows:,} rows)</h3>"
                     f'<table class="run"><tbody>{body}</tbody></table>{missing}')
    spelled = [r for r in ctx.recipes if ctx.labels[r] != r]
    if spelled:
        body = "".join(f'<tr><td class="txt">{escape(ctx.labels[r])}</td>'
                       f'<td class="txt a">{escape(r)}</td></tr>' for r in spelled)
        parts.append("<h3>recipes in full</h3>" + note(
            "Each recipe as written and with every parameter (defaults filled in), as stored "
            "in the results.") + '<table class="run"><thead><tr><th class="txt">recipe</th>'
            f'<th class="txt">in full</th></tr></thead><tbody>{body}</tbody></table>')
    return "\n".join(parts)
