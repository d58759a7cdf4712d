"""A one-file HTML report of a benchmark directory: tables and plots of the measured results.

:func:`build_report` reads ``DIR/results.duckdb`` (opened read-only, so archived results on
read-only media render with ``--output``) and writes ``DIR/report.html``: a single
self-contained page (PNG plots embedded as base64, inline CSS, no JavaScript) with

- a header (models, devices, modes, tasks, lengths, the prompt form: chat template or raw,
  rows, when the report was generated);
- the summary table of :func:`kvlab.bench.summary.summarize`;
- accuracy vs KV memory, with the Pareto frontier (per context length when there are several);
- accuracy per turn, for cases with more than one turn;
- needle heat maps: accuracy on a context length x needle depth grid, one panel per recipe;
- speed and memory bars: context prefill, decode per token, KV memory, peak RSS;
- time vs context length (when the store holds ``speed`` rows of ``benchmarks/speed.py``):
  prefill and decode against length, log-log, with the physical bounds, and the table
  (:mod:`kvlab.bench.timing`);
- perplexity by position (when the store holds ``perplexity`` rows of ``kvlab ppl``): one
  curve per recipe and the in-window vs last-bin table (:mod:`kvlab.bench.ppl_report`);
- fidelity to the ``full`` recipe: token agreement and KL;
- accuracy per task and per context length (recipe x task, recipe x length tables);
- every answer next to its gold answers (collapsed per recipe);
- run details: settings, versions, machine and wall time, from ``DIR/run.json`` (written by
  ``kvlab bench``, see :func:`record_run`).

Every number shown is a measured value or a mean / max of measured values, with its unit.
This module assembles the page (header, sections, CSS); the sections are drawn by
:mod:`kvlab.bench.tables` (HTML tables), :mod:`kvlab.bench.plots` (figures embedded as PNG)
and :mod:`kvlab.bench.pareto` (accuracy vs KV memory), on the rows and colours of
:class:`kvlab.bench.report_context.ReportContext`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import matplotlib

from kvlab.bench.pareto import pareto_front, pareto_section
from kvlab.bench.plots import (
    PLOT_STYLE,
    fidelity_section,
    needle_section,
    speed_section,
    turns_section,
)
from kvlab.bench.ppl_report import PPL_SECTION, ppl_section
from kvlab.bench.report_context import ReportContext, Rows, escape, join, tokens
from kvlab.bench.store import DB_NAME, ResultStore
from kvlab.bench.summary import first_seen
from kvlab.bench.tables import cases_section, run_section, summary_section, tasks_section
from kvlab.bench.timing import time_section
from kvlab.errors import InputError

__all__ = ["REPORT_NAME", "RUN_NAME", "SECTIONS", "TIME_SECTION", "build_report",
           "PPL_SECTION", "pareto_front", "read_runs", "record_run", "render_report"]

TIME_SECTION = ("time", "Time vs length")
"""The section of ``benchmarks/speed.py``'s rows: on the page only when the store has some."""
REPORT_NAME = "report.html"
RUN_NAME = "run.json"

SECTIONS = {
    "summary": "Summary",
    "pareto": "Accuracy vs KV memory",
    "turns": "Accuracy per turn",
    "needle": "Needle in a haystack: accuracy by length and depth",
    "speed": "Speed and memory",
    "fidelity": "Fidelity to full",
    "tasks": "Accuracy per task and length",
    "cases": "Answers per case",
    "run": "Run details",
}


def versions() -> dict[str, str]:
    """Versions of kvlab and the libraries that change results."""
    import torch
    import transformers

    import kvlab

    return {"kvlab": kvlab.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def record_run(directory: Path | str, settings_id: str, details: dict[str, Any]) -> Path:
    """Merge ``details`` (settings, model, dtype, ... as JSON values) into the record of
    ``settings_id`` in ``directory/run.json``, with the versions and the machine; the report's
    run details come from there. A run of other settings in the same directory keeps its own
    record."""
    path = Path(directory) / RUN_NAME
    runs = read_runs(directory)
    record = runs.get(settings_id, {})
    record.update(details)
    record["versions"] = versions()
    record["machine"] = {"cpu cores": os.cpu_count(), "platform": platform.platform(terse=True)}
    runs[settings_id] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(runs, indent=1, default=str) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write the run details {path}: {exc.strerror or exc}; "
                         "choose a writable --out directory") from None
    return path


def read_runs(directory: Path | str) -> dict[str, dict[str, Any]]:
    """``directory/run.json`` by settings id; empty when absent or unreadable (the report
    then says its run details are missing)."""
    path = Path(directory) / RUN_NAME
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return runs if isinstance(runs, dict) else {}


def build_report(directory: Path | str, output: Path | None = None) -> Path:
    """Write the HTML report of the results in ``directory`` to ``output`` (default
    ``directory/report.html``) and return its path."""
    directory = Path(directory)
    db = directory / DB_NAME
    if not db.exists():
        raise InputError(f"no results store {db}: run `kvlab bench` into {directory} first")
    with ResultStore(directory, read_only=True) as store:  # never writes: archives render
        rows, speed, ppl = store.rows(), store.speed_rows(), store.perplexity_rows()
    if not rows and not speed and not ppl:
        raise InputError(f"{db} holds no results yet: nothing to report")
    output = Path(output) if output is not None else directory / REPORT_NAME
    page = render_report(rows, source=str(db), runs=read_runs(directory), speed=speed,
                         perplexity=ppl)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise InputError(
            f"cannot write the report {output} ({exc.strerror}); write it elsewhere with "
            "--output FILE (the results were only read)"
        ) from None
    return output


def render_report(
    rows: Rows, source: str | None = None, generated: dt.datetime | None = None,
    runs: dict[str, dict[str, Any]] | None = None, speed: Rows | None = None,
    perplexity: Rows | None = None,
) -> str:
    """The report page of ``rows`` (as :meth:`ResultStore.rows` returns them), of the
    ``speed`` rows (:meth:`ResultStore.speed_rows`; the "Time vs length" section is there when
    there are some) and of the ``perplexity`` rows (:meth:`ResultStore.perplexity_rows`; the
    "Perplexity by position" section), as HTML."""
    if not rows and not speed and not perplexity:
        raise InputError("no result rows: nothing to report")
    generated = generated or dt.datetime.now().astimezone()
    if not rows:
        return _speed_page(speed or [], source, generated, perplexity or [])
    ctx = ReportContext(rows)
    with matplotlib.rc_context(PLOT_STYLE):
        body = [
            _header(ctx, source, generated, runs or {}, has_time=bool(speed),
                    has_ppl=bool(perplexity)),
            _section("summary", summary_section(ctx)),
            _section("pareto", pareto_section(ctx)),
            _section("turns", turns_section(ctx)),
            _section("needle", needle_section(ctx)),
            _section("speed", speed_section(ctx)),
            *([_section("time", time_section(speed))] if speed else []),
            *([_section("perplexity", ppl_section(perplexity))] if perplexity else []),
            _section("fidelity", fidelity_section(ctx)),
            _section("tasks", tasks_section(ctx)),
            _section("cases", cases_section(ctx)),
            _section("run", run_section(ctx, runs or {})),
        ]
    title = escape(f"kvlab benchmark report: {', '.join(ctx.models)}")
    return (_PAGE_HEAD.replace("@CSS@", _CSS).replace("@TITLE@", title)
            + "\n".join(body) + _PAGE_TAIL)


def _speed_page(speed: Rows, source: str | None, generated: dt.datetime,
                perplexity: Rows | None = None) -> str:
    """The page of a store holding no accuracy rows: a short header, "Time vs length" (speed
    rows) and "Perplexity by position" (perplexity rows)."""
    perplexity = perplexity or []
    both = speed + perplexity
    models = list(dict.fromkeys(str(r["model"]) for r in both))
    devices = list(dict.fromkeys(str(r["device"]) for r in both))
    dtypes = list(dict.fromkeys(str(r["dtype"]) for r in both))
    lengths = {r["context_length"] for r in speed} | {r["length"] for r in perplexity}
    held = [f"{len(speed):,} speed rows (benchmarks/speed.py)"] if speed else []
    held += [f"{len(perplexity):,} perplexity bin rows (kvlab ppl)"] if perplexity else []
    items = [
        ("model" if len(models) == 1 else "models", join(models)),
        ("device" if len(devices) == 1 else "devices", join(devices)),
        ("dtype" if len(dtypes) == 1 else "dtypes", join(dtypes)),
        ("context lengths (tokens)", join(tokens(n) for n in sorted(lengths))),
        ("results", ", ".join(held) + ", no accuracy rows"),
        ("report generated", f"{generated:%Y-%m-%d %H:%M %Z}".strip()),
    ]
    if source:
        items.append(("source", source))
    dl = "\n".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    with matplotlib.rc_context(PLOT_STYLE):
        body = [f"<header><h1>kvlab benchmark report</h1>\n<dl>{dl}</dl></header>",
                *([_section("time", time_section(speed))] if speed else []),
                *([_section("perplexity", ppl_section(perplexity))] if perplexity else [])]
    kind = "speed" if speed and not perplexity else "perplexity" if perplexity and not speed else "benchmark"
    title = escape(f"kvlab {kind} report: {', '.join(models)}")
    return (_PAGE_HEAD.replace("@CSS@", _CSS).replace("@TITLE@", title)
            + "\n".join(body) + _PAGE_TAIL)


def _section(key: str, content: str) -> str:
    title = SECTIONS.get(key) or dict([TIME_SECTION, PPL_SECTION])[key]
    return f'<section id="{key}">\n<h2>{escape(title)}</h2>\n{content}\n</section>'


def _header(ctx: ReportContext, source: str | None, generated: dt.datetime,
            runs: dict[str, dict[str, Any]], has_time: bool = False, has_ppl: bool = False) -> str:
    rows = ctx.rows
    tasks = list(dict.fromkeys((r["task"], r["family"]) for r in rows))
    devices = first_seen(rows, "device")
    cases = len({(r.get("settings_id"), r["case_id"]) for r in rows})
    written = [r["created_at"] for r in rows if r.get("created_at") is not None]
    items = [
        ("model" if len(ctx.models) == 1 else "models", join(ctx.models)),
        ("device" if len(devices) == 1 else "devices", join(devices)),
        ("mode" if len(ctx.modes) == 1 else "modes", join(ctx.modes)),
        ("recipes", join(ctx.labels[r] for r in ctx.recipes)),
        ("tasks", join(f"{t} ({f})" for t, f in tasks)),
        ("context lengths (tokens)", join(tokens(n) for n in ctx.lengths)),
        ("prompt", prompt_forms(rows)),
        ("results", f"{len(rows):,} rows, {cases:,} cases"),
    ]
    records = [runs[str(s)] for s in first_seen(rows, "settings_id") if str(s) in runs]
    for key, label in (("dtype", "dtype"), ("seed", "seed"), ("samples", "samples")):
        values = list(dict.fromkeys(str(r[key]) for r in records if r.get(key) is not None))
        if values:
            items.append((label, ", ".join(values)))
    versions_seen = list(dict.fromkeys(
        ", ".join(f"{k} {v}" for k, v in r["versions"].items() if k != "python")
        for r in records if isinstance(r.get("versions"), dict)))
    if versions_seen:
        items.append(("versions", "; ".join(versions_seen)))
    walls = [r["wall_s"] for r in records if isinstance(r.get("wall_s"), (int, float))]
    if walls:
        items.append(("bench wall time", ", ".join(f"{w / 60:.1f} min" for w in walls)
                      + " (see run details)"))
    if written:
        first, last = min(written), max(written)
        items.append(("results written", f"{first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M}"))
    items.append(("report generated", f"{generated:%Y-%m-%d %H:%M %Z}".strip()))
    if source:
        items.append(("source", source))
    dl = "\n".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    shown = list(SECTIONS.items())
    if has_time:
        shown.insert(list(SECTIONS).index("speed") + 1, TIME_SECTION)
    if has_ppl:
        shown.insert([k for k, _ in shown].index("fidelity"), PPL_SECTION)
    nav = " · ".join(f'<a href="#{k}">{escape(v)}</a>' for k, v in shown)
    return f"<header><h1>kvlab benchmark report</h1>\n<dl>{dl}</dl>\n<nav>{nav}</nav></header>"


PROMPT_FORMS = {
    "chat": "the model's chat template (plain text for a model without one)",
    "raw": "raw, as RULER sends it (input + answer prefix, no chat template)",
}


def prompt_forms(rows: Rows) -> str:
    """Which prompt form the rows' cases were sent in, with the tasks of each when mixed."""
    forms = first_seen([{"prompt": r.get("prompt") or "chat"} for r in rows], "prompt")
    if len(forms) == 1:
        return PROMPT_FORMS.get(forms[0], forms[0])
    parts = []
    for form in forms:
        tasks = dict.fromkeys(r["task"] for r in rows if (r.get("prompt") or "chat") == form)
        parts.append(f"{PROMPT_FORMS.get(form, form)} for {', '.join(tasks)}")
    return "; ".join(parts)


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
span.n { color: #666; font-size: 11px; }
details.cases { margin: 4px 0; }
details.cases summary { cursor: pointer; padding: 3px 0; }
span.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; }
table.cases { font-size: 13px; }
table.cases td.q { max-width: 360px; }
table.cases td.a { max-width: 260px; overflow-wrap: anywhere; font-family: ui-monospace, monospace; }
table.cases td.ok { background: #d9f0d3; }
table.cases td.bad { background: #f8d5d0; }
table.cases td.part { background: #fdf1c7; }
table.run th { text-align: left; font-weight: normal; color: #555; background: none; }
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
