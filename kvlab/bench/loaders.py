"""Loading the original benchmark files (local JSONL only: kvlab never downloads data).

Formats (``fmt``):

- ``ruler`` (RULER, arXiv:2404.06654): ``{"index", "input", "outputs": [...], "length"?,
  "answer_prefix"?, "token_position_answer"?}``. RULER's ``input`` ends with the question.
  Convention: the last line among the final four non-empty lines that starts like a question
  (``Question:``, ``What``, ``Which``, ``Find``, ``Who``, ``How``, ``When``, ``Where``,
  ``Answer the question``) starts the question; what precedes it is the context. When no such
  line is found, the whole input is the context and the question is ``""``. Files prepared
  with RULER's ``base`` template (no chat template) split cleanly. The task name is the file's
  folder for ``validation.jsonl``/``test.jsonl`` (RULER's layout), else its stem; ``qa*``
  tasks use ``string_match_part``, the rest ``string_match_all``.

  The case's length (``target_tokens``, what results are grouped by) is RULER's nominal
  sequence length: given with the file (``PATH:ruler:4k``, ``length=``), else taken from
  RULER's run layout ``<length>/data/<task>/validation.jsonl`` (or ``<length>/<task>/...``),
  else from a ``max_length``/``max_seq_length`` field, else 0 (unknown). RULER's ``length``
  field (input plus generated tokens, e.g. 2,022-2,047 for 2k cases) is never used for
  grouping; it is kept in ``meta["length"]``. The needle depth is ``token_position_answer /
  (length - tokens to generate)`` (RULER's niah files; ``None`` without those fields).

  Prompt forms: by default the context and question go through the model's chat template
  and the answer prefix is stripped of surrounding spaces. With ``raw_prompt=True``
  (``kvlab bench --raw-prompt``) the case holds RULER's text exactly (``input`` split at the
  question line, ``answer_prefix`` with its spaces) and :mod:`kvlab.bench.raw_prompt` sends
  ``input + answer_prefix`` with no chat template, as RULER's ``call_api.py`` does.
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

Case ids come from the record itself: ``{format}-{task}-{line}-{hash}``, the hash over the
file's absolute path, the line number, the nominal length, the whole record and the prompt
form (a raw-prompt case is another case than its chat-template twin). So two files
with one name in different folders (RULER's layout names every length's file
``validation.jsonl``), or records repeating an ``index`` (RULER's niah generator writes the
needle's character offset there), are all distinct cases. The record's own ``index``/``_id``/
``id`` is kept in ``meta["index"]``.

Blank lines are skipped; any other malformed line (not UTF-8, not JSON, a missing field)
raises :class:`~kvlab.errors.InputError` (a ``ValueError``) naming the file and line number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlab.bench.cases import Case, Turn
from kvlab.bench.metrics import METRICS
from kvlab.bench.lengths import parse_length
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
    if value is None and default is not ...:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Malformed(f"field {key!r} has type {type(value).__name__}")
    return value


def _answers(value: Any, key: str) -> list[str]:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise _Malformed(f"field {key!r} must be a string, a number or a list of them")


def question_start(text: str) -> int | None:
    """Offset in ``text`` where the question line starts (the module docstring's
    convention), or ``None`` when there is no question line after some context."""
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    seen = 0
    for start in reversed(starts):
        line = text[start:].split("\n", 1)[0].strip()
        if not line:
            continue
        if _QUESTION.match(line) and text[:start].strip():
            return start + (len(text[start:]) - len(text[start:].lstrip()))
        seen += 1
        if seen == 4:
            break
    return None


def split_ruler_input(text: str) -> tuple[str, str]:
    """(context, question) of a RULER ``input``, stripped (see the module docstring)."""
    start = question_start(text)
    if start is None:
        return text, ""
    return text[:start].rstrip(), text[start:].strip()


def _ruler_length(path: Path, record: dict[str, Any], given: int | None) -> int:
    """RULER's nominal sequence length of a record (see the module docstring), 0 if unknown."""
    if given is not None:
        return given
    folders = path.parent.parent, path.parent.parent.parent
    if path.stem in ("validation", "test"):
        if folders[0].name.isdigit():
            return int(folders[0].name)
        if folders[0].name == "data" and folders[1].name.isdigit():
            return int(folders[1].name)
    for key in ("max_length", "max_seq_length"):
        value = _get(record, key, int, None)
        if value is not None:
            return value
    return 0


@dataclass(frozen=True)
class _Source:
    """Where a record comes from and how to read it."""

    path: Path
    name: str
    metric: str | None
    length: int | None
    raw_prompt: bool

    def case_id(self, prefix: str, line: int, record: dict[str, Any], target: int) -> str:
        parts: list[Any] = [str(self.path.resolve()), line, target, record]
        if self.raw_prompt:  # the other prompt form is another case (its own rows)
            parts.append("raw")
        key = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
        return f"{prefix}-{line}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _ruler(record: dict[str, Any], source: _Source, line: int) -> Case:
    name = source.name
    text = _get(record, "input", str)
    index = record.get("index")
    tokens = next((v for k, v in _RULER_TOKENS.items() if name.startswith(k)), 128)
    prefix = _get(record, "answer_prefix", str, "")
    if source.raw_prompt:
        start = question_start(text)
        start = len(text) if start is None else start
        context, question = text[:start], text[start:]
    else:
        (context, question), prefix = split_ruler_input(text), prefix.strip()
    turn = Turn(
        question,
        _answers(_get(record, "outputs", list), "outputs"),
        source.metric or ("string_match_part" if name.startswith("qa") else "string_match_all"),
        prefix,
        _get(record, "max_new_tokens", int, tokens),
    )
    target = _ruler_length(source.path, record, source.length)
    length = _get(record, "length", int, None)
    position = _get(record, "token_position_answer", int, None)
    depth = None
    if position is not None and length is not None and length - tokens > 0:
        depth = round(min(max(position / (length - tokens), 0.0), 1.0), 4)
    meta = {"source": "ruler", "index": index, "length": length, "input": text,
            "token_position_answer": position}
    case_id = source.case_id(f"ruler-{name}", line, record, target)
    return Case(case_id, name, context, [turn], target, depth, meta,
                "raw" if source.raw_prompt else "chat")


def _longbench(record: dict[str, Any], source: _Source, line: int) -> Case:
    dataset = _get(record, "dataset", str, source.name)
    turn = Turn(
        _get(record, "input", str),
        _answers(_get(record, "answers", list), "answers"),
        source.metric or "string_match_part",
        "",
        _LONGBENCH_TOKENS.get(dataset.removesuffix("_e"), 64),
    )
    meta = {k: record[k] for k in ("length", "language", "all_classes") if k in record}
    meta.update(source="longbench", index=_get(record, "_id", str, None))
    case_id = source.case_id(f"longbench-{dataset}", line, record, 0)
    return Case(case_id, dataset, _get(record, "context", str), [turn], 0, None, meta)


def _scbench_metric(name: str) -> str:
    base = name.removeprefix("scbench_")
    if base in ("kv", "prefix_suffix") or base.endswith("_kv"):
        return "contains"
    return {"vt": "string_match_all", "mf": "first_number"}.get(base, "string_match_part")


def _scbench(record: dict[str, Any], source: _Source, line: int) -> Case:
    name, metric = source.name, source.metric
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
    meta = {"source": "scbench", "index": _get(record, "id", (int, str), None)}
    context = _get(record, "context", str)
    case_id = source.case_id(f"scbench-{name}", line, record, 0)
    return Case(case_id, name, context, turns, 0, None, meta)


_PARSERS: dict[str, Callable[[dict[str, Any], _Source, int], Case]] = {
    "ruler": _ruler,
    "longbench": _longbench,
    "scbench": _scbench,
}


def _task_name(path: Path, fmt: str) -> str:
    if fmt == "ruler" and path.stem in ("validation", "test") and path.parent.name:
        return path.parent.name
    return path.stem.removeprefix("scbench_") if fmt == "scbench" else path.stem


def parse_data_item(item: str) -> tuple[str, str, int | None]:
    """``PATH:FORMAT`` or ``PATH:FORMAT:LENGTH`` (``--data``) -> (path, format, length)."""
    parts = item.rsplit(":", 2)
    if len(parts) == 3 and parts[1] in FORMATS:
        if parts[1] != "ruler":
            raise InputError(f"data {item!r}: only ruler files take a :LENGTH (PATH:ruler:4k)")
        try:
            return parts[0], parts[1], parse_length(parts[2])
        except InputError as exc:
            raise InputError(f"data {item!r}: {exc}") from None
    path, _, fmt = item.rpartition(":")
    if not path or fmt not in FORMATS:
        raise InputError(
            f"data {item!r}: write PATH:FORMAT with FORMAT one of {', '.join(FORMATS)} "
            "(ruler files may add their nominal length: PATH:ruler:4k)"
        )
    return path, fmt, None


def _lines(source: Path) -> Iterator[tuple[int, str]]:
    """(number, text) of each line of ``source``, decoded as UTF-8 (a BOM is allowed)."""
    try:
        handle = source.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read benchmark file {str(source)!r}: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{source}: line {number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                    f"byte {exc.start + 1} of the line); save the file as UTF-8"
                ) from None
            yield number, text.removeprefix("\ufeff") if number == 1 else text


def load_jsonl(
    path: str | os.PathLike[str], fmt: str, *, task: str | None = None, metric: str | None = None,
    length: int | None = None, raw_prompt: bool = False,
) -> list[Case]:
    """The cases of a local JSONL file in ``fmt`` (``ruler``, ``longbench`` or ``scbench``).

    ``task`` overrides the task name taken from the path; ``metric`` overrides every turn's
    metric; ``length`` is a RULER file's nominal length (else from its path or fields, see
    the module docstring); ``raw_prompt`` keeps RULER's prompt text exactly (ruler only).
    Raises :class:`~kvlab.errors.InputError` for a bad format name, a missing file, or a
    malformed line (the message names the line).
    """
    if fmt not in _PARSERS:
        raise InputError(f"unknown benchmark format {fmt!r}: use one of {', '.join(FORMATS)}")
    if metric is not None and metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}: use one of {', '.join(sorted(METRICS))}")
    if raw_prompt and fmt != "ruler":
        raise InputError(f"raw_prompt applies to ruler files only, not {fmt}")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"benchmark file {str(path)!r} not found")
    source = _Source(path, task or _task_name(path, fmt), metric, length, raw_prompt)
    cases: list[Case] = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {number}: expected a JSON object")
        try:
            cases.append(_PARSERS[fmt](record, source, number))
        except _Malformed as exc:
            raise InputError(f"{path}: line {number}: {fmt} record: {exc}") from None
    return cases
