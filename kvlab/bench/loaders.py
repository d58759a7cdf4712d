"""Loading the original benchmark files (local JSONL only: kvlab never downloads data).

Formats (``fmt``):

- ``ruler`` (RULER, arXiv:2404.06654): ``{"index", "input", "outputs": [...], "length"?,
  "answer_prefix"?}``. RULER's ``input`` ends with the question. Convention: the last line
  among the final four non-empty lines that starts like a question (``Question:``, ``What``,
  ``Which``, ``Find``, ``Who``, ``How``, ``When``, ``Where``, ``Answer the question``) starts
  the question; what precedes it is the context. When no such line is found, the whole input
  is the context and the question is ``""``. Files prepared with RULER's ``base`` template
  (no chat template) split cleanly. The task name is the file's folder for
  ``validation.jsonl``/``test.jsonl`` (RULER's layout), else its stem; ``qa*`` tasks use
  ``string_match_part``, the rest ``string_match_all``.
- ``longbench``: ``{"context", "input", "answers": [...], "length", "dataset", "_id"}``; the
  question is ``input``. LongBench's official metrics (F1, ROUGE, accuracy) are not
  implemented: turns use ``string_match_part``. ``length`` (words, not tokens) is kept in
  ``meta["length"]``; ``target_tokens`` is 0.
- ``scbench`` (SCBench, arXiv:2412.10319): ``{"id", "context", "multi_turns": [{"input",
  "answer", "options"?, "task"?}]}``; one turn per entry. ``options`` are appended to the
  question as ``A. ...`` lines. Metrics by task (a turn's ``task``, else the file stem without
  ``scbench_``): ``kv``/``prefix_suffix`` -> ``contains``, ``vt`` -> ``string_match_all``,
  ``mf`` -> ``first_number``, others -> ``string_match_part`` (an approximation of SCBench's
  own QA and summary scoring).

Blank lines are skipped; any other malformed line raises :class:`~kvlab.errors.InputError`
(a ``ValueError``) naming the file and line number.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvlab.bench.cases import Case, Turn
from kvlab.bench.metrics import METRICS
from kvlab.errors import InputError

FORMATS = ("ruler", "longbench", "scbench")
_QUESTION = re.compile(
    r"(Question:|What\b|Which\b|Find\b|Who\b|How\b|When\b|Where\b|Answer the question)"
)
_RULER_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
_LONGBENCH_TOKENS = {"gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512,
                     "narrativeqa": 128, "qasper": 128, "samsum": 128}


class _Malformed(Exception):
    """A record lacks a field or has one of the wrong type."""


def _get(
    record: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    if key not in record:
        if default is ...:
            raise _Malformed(f"missing field {key!r}")
        return default
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Malformed(f"field {key!r} has type {type(value).__name__}")
    return value


def _answers(value: Any, key: str) -> list[str]:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise _Malformed(f"field {key!r} must be a string, a number or a list of them")


def split_ruler_input(text: str) -> tuple[str, str]:
    """(context, question) of a RULER ``input`` (see the module docstring's convention)."""
    lines = text.rstrip().split("\n")
    seen = 0
    for i in range(len(lines) - 1, -1, -1):
        if not lines[i].strip():
            continue
        if _QUESTION.match(lines[i].strip()):
            context = "\n".join(lines[:i]).rstrip()
            if context:
                return context, "\n".join(lines[i:]).strip()
        seen += 1
        if seen == 4:
            break
    return text, ""


def _ruler(record: dict[str, Any], name: str, metric: str | None, line: int) -> Case:
    context, question = split_ruler_input(_get(record, "input", str))
    index = _get(record, "index", int, line - 1)
    tokens = next((v for k, v in _RULER_TOKENS.items() if name.startswith(k)), 128)
    turn = Turn(
        question,
        _answers(_get(record, "outputs", list), "outputs"),
        metric or ("string_match_part" if name.startswith("qa") else "string_match_all"),
        _get(record, "answer_prefix", str, "").strip(),
        _get(record, "max_new_tokens", int, tokens),
    )
    meta = {"source": "ruler", "index": index, "input": record["input"]}
    length = _get(record, "length", int, 0)
    return Case(f"ruler-{name}-{index}", name, context, [turn], length, None, meta)


def _longbench(record: dict[str, Any], name: str, metric: str | None, line: int) -> Case:
    dataset = _get(record, "dataset", str, name)
    turn = Turn(
        _get(record, "input", str),
        _answers(_get(record, "answers", list), "answers"),
        metric or "string_match_part",
        "",
        _LONGBENCH_TOKENS.get(dataset.removesuffix("_e"), 64),
    )
    case_id = str(_get(record, "_id", str, f"longbench-{dataset}-{line}"))
    meta = {k: record[k] for k in ("length", "language", "all_classes") if k in record}
    meta["source"] = "longbench"
    return Case(case_id, dataset, _get(record, "context", str), [turn], 0, None, meta)


def _scbench_metric(name: str) -> str:
    base = name.removeprefix("scbench_")
    if base in ("kv", "prefix_suffix") or base.endswith("_kv"):
        return "contains"
    return {"vt": "string_match_all", "mf": "first_number"}.get(base, "string_match_part")


def _scbench(record: dict[str, Any], name: str, metric: str | None, line: int) -> Case:
    entries = _get(record, "multi_turns", list)
    if not entries:
        raise _Malformed("field 'multi_turns' is empty")
    turns = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise _Malformed("a 'multi_turns' entry is not an object")
        question = _get(entry, "input", str)
        options = _get(entry, "options", list, [])
        if options:
            question += "\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
        task = _get(entry, "task", str, name)
        if "answer" not in entry:
            raise _Malformed("a 'multi_turns' entry has no field 'answer'")
        answers = _answers(entry["answer"], "answer")
        turns.append(Turn(question, answers, metric or _scbench_metric(task), "", 64))
    record_id = _get(record, "id", (int, str), line - 1)
    meta = {"source": "scbench", "index": record_id}
    context = _get(record, "context", str)
    return Case(f"scbench-{name}-{record_id}", name, context, turns, 0, None, meta)


_PARSERS: dict[str, Callable[[dict[str, Any], str, str | None, int], Case]] = {
    "ruler": _ruler,
    "longbench": _longbench,
    "scbench": _scbench,
}


def _task_name(path: Path, fmt: str) -> str:
    if fmt == "ruler" and path.stem in ("validation", "test") and path.parent.name:
        return path.parent.name
    return path.stem.removeprefix("scbench_") if fmt == "scbench" else path.stem


def load_jsonl(
    path: str | os.PathLike[str], fmt: str, *, task: str | None = None, metric: str | None = None
) -> list[Case]:
    """The cases of a local JSONL file in ``fmt`` (``ruler``, ``longbench`` or ``scbench``).

    ``task`` overrides the task name taken from the path; ``metric`` overrides every turn's
    metric. Raises :class:`~kvlab.errors.InputError` for a bad format name, a missing file,
    or a malformed line (the message names the line).
    """
    if fmt not in _PARSERS:
        raise InputError(f"unknown benchmark format {fmt!r}: use one of {', '.join(FORMATS)}")
    if metric is not None and metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}: use one of {', '.join(sorted(METRICS))}")
    source = Path(path)
    if not source.is_file():
        raise InputError(f"benchmark file {str(source)!r} not found")
    name = task or _task_name(source, fmt)
    cases: list[Case] = []
    with source.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{source}: line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{source}: line {number}: expected a JSON object")
            try:
                cases.append(_PARSERS[fmt](record, name, metric, number))
            except _Malformed as exc:
                raise InputError(f"{source}: line {number}: {fmt} record: {exc}") from None
    return cases
