"""JSONL loaders for local RULER, LongBench and SCBench files."""

from __future__ import annotations

import json

import pytest

from kvlab.bench.loaders import load_jsonl, parse_data_item, split_ruler_input
from kvlab.bench.metrics import score
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
    assert [c.id.rsplit("-", 1)[0] for c in cases] == [
        f"ruler-niah_single_2-{line}" for line in (1, 3, 4)
    ]
    assert [c.meta["index"] for c in cases] == [0, 1, 2]
    first = cases[0]
    # RULER's `length` (input + generated tokens) is not the case's length: no nominal
    # length in this path or record, so it is unknown (0)
    assert first.task == "niah_single_2" and first.target_tokens == 0
    assert first.meta["length"] == 4096 and first.prompt == "chat"
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


def _niah(index: int, value: str = "1234567", **fields) -> dict:
    return {"index": index, "input": NIAH_INPUT.replace("1234567", value), "outputs": [value],
            **fields}


def test_ruler_layout_same_named_files_are_distinct_cases_with_their_length(tmp_path):
    """RULER's run layout names every length's file <length>/data/<task>/validation.jsonl
    with indices 0..N-1: every record of every file is its own case, grouped by the length
    in the path, never by the `length` field."""
    ids = set()
    for nominal, lengths in ((2048, (2022, 2047)), (4096, (4070, 4090))):
        path = _write(tmp_path / "m" / "synthetic" / str(nominal) / "data" / "vt" /
                      "validation.jsonl", [_niah(i, length=n) for i, n in enumerate(lengths)])
        cases = load_jsonl(path, "ruler")
        assert [c.target_tokens for c in cases] == [nominal, nominal]
        assert [c.meta["length"] for c in cases] == list(lengths)
        assert {c.task for c in cases} == {"vt"}
        ids |= {c.id for c in cases}
    assert len(ids) == 4
    flat = _write(tmp_path / "8192" / "niah_single_1" / "test.jsonl", [_niah(0)])
    assert load_jsonl(flat, "ruler")[0].target_tokens == 8192


def test_ruler_repeated_indices_and_identical_lines_are_all_cases(tmp_path):
    # RULER's niah generator writes the needle's character offset into `index`
    records = [_niah(57, "1111111"), _niah(57, "2222222"), _niah(3), _niah(3)]
    cases = load_jsonl(_write(tmp_path / "niah_single_1.jsonl", records), "ruler")
    assert len(cases) == 4 and len({c.id for c in cases}) == 4
    answers = [c.turns[0].answers for c in cases]
    assert answers == [["1111111"], ["2222222"], ["1234567"], ["1234567"]]
    again = load_jsonl(tmp_path / "niah_single_1.jsonl", "ruler")
    assert [c.id for c in again] == [c.id for c in cases]  # stable: resume finds them


def test_ruler_nominal_length_from_argument_or_field(tmp_path):
    path = _write(tmp_path / "niah_single_1.jsonl", [_niah(0, length=2040),
                                                     _niah(1, max_length=4096)])
    assert [c.target_tokens for c in load_jsonl(path, "ruler")] == [0, 4096]
    given = load_jsonl(path, "ruler", length=2048)
    assert [c.target_tokens for c in given] == [2048, 2048]
    assert given[0].id != load_jsonl(path, "ruler")[0].id


def test_ruler_depth_from_token_position_answer(tmp_path):
    path = _write(tmp_path / "2048" / "data" / "niah_single_1" / "validation.jsonl", [
        _niah(0, length=2000 + 128, token_position_answer=500),
        _niah(1, length=2048, token_position_answer=None),
        _niah(2, token_position_answer=10),  # no length: depth unknown
    ])
    depths = [c.depth for c in load_jsonl(path, "ruler")]
    assert depths == [0.25, None, None]


def test_ruler_raw_prompt_keeps_rulers_text_exactly(tmp_path):
    vt_prefix = (" Answer: According to the chain(s) of variable assignment in the text above, "
                 "1 variables are assigned the value 12345, they are: ")
    path = _write(tmp_path / "4096" / "data" / "vt" / "validation.jsonl", [
        {"index": 0, "input": VT_INPUT, "outputs": ["ABCDE"], "answer_prefix": vt_prefix},
        {"index": 1, "input": "no question marker here", "outputs": ["x"]},
    ])
    raw = load_jsonl(path, "ruler", raw_prompt=True)
    for case, record_input in zip(raw, (VT_INPUT, "no question marker here")):
        (turn,) = case.turns
        assert case.prompt == "raw"
        assert case.context + turn.question == record_input
    assert raw[0].turns[0].question.startswith("Question: Find all variables")
    assert raw[0].turns[0].answer_prefix == vt_prefix  # trailing space kept
    chat = load_jsonl(path, "ruler")
    assert chat[0].turns[0].answer_prefix == vt_prefix.strip()
    assert {c.id for c in raw}.isdisjoint(c.id for c in chat)
    scb = _write(tmp_path / "scbench_kv.jsonl", [])
    with pytest.raises(InputError, match="ruler files only"):
        load_jsonl(scb, "scbench", raw_prompt=True)


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "niah.jsonl"
    good = json.dumps(_niah(0)).encode()
    path.write_bytes(good + b"\n" + good.replace(b"special", b"sp\xe9cial") + b"\n")
    with pytest.raises(InputError, match=r"niah.jsonl: line 2: not UTF-8 text \(byte 0xe9"):
        load_jsonl(path, "ruler")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert len(load_jsonl(bom, "ruler")) == 1


def test_parse_data_item():
    assert parse_data_item("a/b.jsonl:ruler") == ("a/b.jsonl", "ruler", None)
    assert parse_data_item("c:/x/b.jsonl:ruler:4k") == ("c:/x/b.jsonl", "ruler", 4096)
    assert parse_data_item("x.jsonl:longbench") == ("x.jsonl", "longbench", None)
    with pytest.raises(InputError, match="only ruler files take a :LENGTH"):
        parse_data_item("x.jsonl:scbench:4k")
    with pytest.raises(InputError, match="PATH:FORMAT"):
        parse_data_item("x.jsonl:csv")


def _ruler_string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's metric (scripts/eval/synthetic/constants.py), written from its definition:
    per prediction, the fraction of its references r with r.lower() in pred.lower(); the
    mean over predictions, x 100, rounded to 2 decimals."""
    total = sum(sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref)
                for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


def _ruler_string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    total = sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref)
                for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


RULER_PREDICTIONS = [
    # (task, references, prediction)
    ("niah_single_1", ["8140467"], " 8140467."),
    ("niah_single_1", ["8140467"], "The number is 814046"),
    ("niah_multivalue", ["1111111", "2222222", "3333333", "4444444"],
     "1111111, 3333333 and 4444444"),
    ("niah_multikey_3", ["a1b2c3d4-AAAA-bbbb-cccc-0123456789ab"],
     "A1B2C3D4-aaaa-BBBB-cccc-0123456789AB"),
    ("vt", ["ABCDE", "FGHIJ", "KLMNO"], "ABCDE FGHIJ\nKLMNO"),
    ("vt", ["ABCDE", "FGHIJ"], "abcde"),
    ("cwe", [f"w{i}" for i in range(10)], "w1 w2 w3 w10"),  # 3 of 10 (w10 is not w0)
    ("fwe", ["xyz", "abc", "def"], ""),
    ("qa_1", ["Paris", "Paris, France"], "paris"),
    ("qa_2", ["Bob", "Robert"], "Al"),
]


def test_scores_equal_rulers_own_metrics(tmp_path):
    """kvlab's scores of RULER records (metric as the loader picks it per task) equal RULER's
    string_match_all / string_match_part on the same predictions."""
    by_metric: dict[str, tuple[list[str], list[list[str]], list[float]]] = {}
    for i, (task, refs, prediction) in enumerate(RULER_PREDICTIONS):
        path = _write(tmp_path / f"t{i}" / task / "validation.jsonl",
                      [{"index": 0, "input": "ctx\nWhat?", "outputs": refs}])
        (turn,) = load_jsonl(path, "ruler")[0].turns
        preds, golds, scores = by_metric.setdefault(turn.metric, ([], [], []))
        preds.append(prediction)
        golds.append(turn.answers)
        scores.append(score(turn.metric, prediction, turn.answers))
    assert set(by_metric) == {"string_match_all", "string_match_part"}
    ruler = {"string_match_all": _ruler_string_match_all,
             "string_match_part": _ruler_string_match_part}
    for metric, (preds, golds, scores) in by_metric.items():
        for p, g, s in zip(preds, golds, scores):
            assert round(s * 100, 2) == ruler[metric]([p], [g])
        assert round(sum(scores) / len(scores) * 100, 2) == ruler[metric](preds, golds)

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
    assert case.id.startswith("longbench-hotpotqa-1-") and case.meta["index"] == "abc123"
    assert case.task == "hotpotqa" and case.context == "Passage 1: ..."
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
    assert case.id.startswith("scbench-kv-1-") and case.meta["index"] == 3
    assert case.task == "kv" and len(case.turns) == 2
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
