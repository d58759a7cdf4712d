"""JSONL loaders for local RULER, LongBench and SCBench files."""

from __future__ import annotations

import json

import pytest

from kvlab.bench.loaders import load_jsonl, split_ruler_input
from kvlab.errors import InputError

NIAH_INPUT = (
    "Some special magic numbers are hidden within the following text.\n"
    "The grass is green. One of the special magic numbers for calm-otter is: 1234567.\n"
    "What is the special magic number for calm-otter mentioned in the provided text?"
)
VT_INPUT = (
    "Memorize the chains.\nVAR ABCDE = 12345.\n"
    "Question: Find all variables that are assigned the value 12345 in the text above."
)


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ruler(tmp_path):
    prefix = " The special magic number for calm-otter mentioned in the provided text is"
    path = _write(tmp_path / "niah_single_2" / "validation.jsonl", [
        {"index": 0, "input": NIAH_INPUT, "outputs": ["1234567"], "length": 4096,
         "answer_prefix": prefix},
        "",
        {"index": 1, "input": VT_INPUT, "outputs": ["ABCDE"]},
        {"index": 2, "input": "no question marker here", "outputs": ["x"]},
    ])
    cases = load_jsonl(path, "ruler")
    assert [c.id for c in cases] == [f"ruler-niah_single_2-{i}" for i in range(3)]
    first = cases[0]
    assert first.task == "niah_single_2" and first.target_tokens == 4096
    assert first.context.endswith("is: 1234567.")
    (turn,) = first.turns
    assert turn.question.startswith("What is the special magic number")
    assert turn.answers == ["1234567"] and turn.metric == "string_match_all"
    assert turn.answer_prefix == prefix.strip()
    assert cases[1].turns[0].question.startswith("Question: Find all variables")
    assert cases[1].context.endswith("VAR ABCDE = 12345.") and cases[1].target_tokens == 0
    assert cases[2].context == "no question marker here" and cases[2].turns[0].question == ""
    qa = _write(tmp_path / "qa_1.jsonl", [
        {"index": 0, "input": "Docs...\n\nQuestion: Who?", "outputs": ["A", "B"]},
    ])
    assert load_jsonl(qa, "ruler")[0].turns[0].metric == "string_match_part"


def test_split_ruler_input_only_looks_at_the_end():
    text = "What is this?\n" + "\n".join(f"line {i}" for i in range(10))
    assert split_ruler_input(text) == (text, "")


def test_longbench(tmp_path):
    path = _write(tmp_path / "hotpotqa.jsonl", [{
        "input": "Which city is bigger?", "context": "Passage 1: ...", "answers": ["Paris"],
        "length": 9151, "dataset": "hotpotqa", "language": "en", "all_classes": None,
        "_id": "abc123",
    }])
    (case,) = load_jsonl(path, "longbench")
    assert case.id == "abc123" and case.task == "hotpotqa" and case.context == "Passage 1: ..."
    (turn,) = case.turns
    assert turn.question == "Which city is bigger?" and turn.answers == ["Paris"]
    assert turn.metric == "string_match_part" and turn.max_new_tokens == 64
    assert case.meta["length"] == 9151 and case.target_tokens == 0


def test_scbench(tmp_path):
    path = _write(tmp_path / "scbench_kv.jsonl", [{
        "id": 3, "context": "JSON data: {...}",
        "multi_turns": [
            {"input": 'Key: "k1"', "answer": "v1"},
            {"input": 'Key: "k2"', "answer": ["v2"]},
        ],
    }])
    (case,) = load_jsonl(path, "scbench")
    assert case.id == "scbench-kv-3" and case.task == "kv" and len(case.turns) == 2
    assert [t.answers for t in case.turns] == [["v1"], ["v2"]]
    assert {t.metric for t in case.turns} == {"contains"}
    mf = _write(tmp_path / "scbench_mf.jsonl", [
        {"id": 0, "context": "[1, 5, 3]", "multi_turns": [{"input": "largest?", "answer": 5}]},
    ])
    (turn,) = load_jsonl(mf, "scbench")[0].turns
    assert turn.answers == ["5"] and turn.metric == "first_number"
    choice = _write(tmp_path / "scbench_choice_eng.jsonl", [{
        "id": 1, "context": "A story.",
        "multi_turns": [{"input": "Who?", "answer": "Bob", "options": ["Al", "Bob"]}],
    }])
    (turn,) = load_jsonl(choice, "scbench", metric="contains")[0].turns
    assert turn.question == "Who?\nA. Al\nB. Bob" and turn.metric == "contains"


def _line(record: object) -> str:
    return json.dumps(record)


MALFORMED = [
    ("ruler", "{not json", "line 2: not valid JSON"),
    ("ruler", _line([1, 2]), "line 2: expected a JSON object"),
    ("ruler", _line({"index": 1, "input": "x"}), "line 2: ruler record: missing field 'outputs'"),
    ("ruler", _line({"input": 3, "outputs": []}), "line 2: .*field 'input' has type int"),
    ("longbench", _line({"input": "q", "context": "c"}), "line 2: .*missing field 'answers'"),
    ("scbench", _line({"id": 1, "context": "c", "multi_turns": []}), "line 2: .*is empty"),
    ("scbench", _line({"id": 1, "context": "c", "multi_turns": [{"input": "q"}]}),
     "line 2: .*no field 'answer'"),
]


@pytest.mark.parametrize("fmt, line, message", MALFORMED)
def test_malformed_lines_name_the_line(tmp_path, fmt, line, message):
    good = {
        "ruler": {"index": 0, "input": "ctx\nWhat?", "outputs": ["a"]},
        "longbench": {"input": "q", "context": "c", "answers": ["a"]},
        "scbench": {"id": 0, "context": "c", "multi_turns": [{"input": "q", "answer": "a"}]},
    }[fmt]
    path = _write(tmp_path / "data.jsonl", [good, line])
    with pytest.raises(ValueError, match=message):
        load_jsonl(path, fmt)


def test_bad_format_metric_and_path(tmp_path):
    path = _write(tmp_path / "x.jsonl", [{"index": 0, "input": "a", "outputs": ["b"]}])
    with pytest.raises(InputError, match="format 'csv'.*ruler, longbench, scbench"):
        load_jsonl(path, "csv")
    with pytest.raises(InputError, match="unknown metric"):
        load_jsonl(path, "ruler", metric="bleu")
    with pytest.raises(InputError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl", "ruler")
