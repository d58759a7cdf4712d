"""Generated cases: length fitting, needles, answers by construction, determinism, depth."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest

from kvlab.bench.cases import Case
from kvlab.corpus import (
    haystack_units,
    prose_text,
    prose_words,
    split_sentences,
    vocabulary,
    weave,
)
from kvlab.bench.fit import fit_units
from kvlab.bench.tasks import TASKS, generate, get_task
from kvlab.errors import InputError

LENGTHS = (1000, 4000)
NIAH = ("niah_single", "niah_single_prose", "niah_multikey", "niah_multivalue", "niah_multiquery")
NEEDLE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")
STATEMENT = re.compile(r"VAR ([A-Z]+) = (VAR ([A-Z]+)|\d+)\.")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(TASKS))
def test_context_length_within_two_percent(make_case, count, task, length):
    case = make_case(task, length)
    tokens = count(case.context)
    assert abs(tokens - length) <= 0.02 * length, (task, length, tokens)
    assert case.meta["tokens"] == tokens
    assert case.target_tokens == length and case.task == task
    assert case.id == f"{task}-{length}-7-0"
    assert 1 <= len(case.turns) <= 5 and all(t.answers for t in case.turns)
    for turn in case.turns:  # the context never holds the question
        assert turn.question and turn.question not in case.context


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_once_and_answers(make_case, task, length):
    case = make_case(task, length)
    found = NEEDLE.findall(case.context)
    values: dict[str, list[str]] = {}
    for key, value in found:
        values.setdefault(key, []).append(value)
        assert case.context.count(value) == 1
    rebuilt = [f"One of the special magic numbers for {k} is: {v}." for k, v in found]
    assert sorted(rebuilt) == sorted(case.meta["needles"])
    for needle in case.meta["needles"]:
        assert case.context.count(needle) == 1
    shape = {
        "niah_single": (1, 1, 1), "niah_single_prose": (1, 1, 1), "niah_multikey": (4, 1, 1),
        "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4),
    }[task]
    assert len(values) == shape[0] and all(len(v) == shape[1] for v in values.values())
    (turn,) = case.turns
    asked = [k for k in values if k in turn.question]
    assert len(asked) == shape[2]
    assert sorted(turn.answers) == sorted(v for k in asked for v in values[k])
    assert turn.metric == "string_match_all" and asked[0] in turn.answer_prefix


@pytest.mark.parametrize("length", LENGTHS)
def test_niah_multiturn_asks_another_needle_each_turn(make_case, length):
    case = make_case("niah_multiturn", length)
    values = dict(NEEDLE.findall(case.context))
    assert len(values) == 3 and len(case.turns) == 3
    asked = []
    for turn in case.turns:
        (key,) = [k for k in values if k in turn.question]
        assert turn.answers == [values[key]] and key in turn.answer_prefix
        asked.append(key)
    assert sorted(asked) == sorted(values)  # every needle is asked once


def test_niah_haystacks(make_case):
    noise = make_case("niah_single", 1000).context
    assert "The grass is green. The sky is blue." in noise
    prose = make_case("niah_single_prose", 1000).context
    assert "The grass is green" not in prose
    body = NEEDLE.sub("", prose.split("\n\n", 1)[1])
    assert len(set(body.split()) & set(prose_text().split())) > 50


def _resolve(context: str) -> dict[str, str]:
    """Each variable's final value, following the chain statements in order."""
    resolved: dict[str, str] = {}
    for name, rhs, source in STATEMENT.findall(context):
        resolved[name] = resolved[source] if source else rhs
    return resolved


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", ["variable_tracking", "multi_hop"])
def test_chains_answers_by_construction(make_case, task, length):
    case = make_case(task, length)
    statements = STATEMENT.findall(case.context)
    names = [name for name, _, _ in statements]
    assert len(names) == len(set(names))  # each variable assigned once
    for name in names:
        assert case.context.count(f"VAR {name} =") == 1
    resolved = _resolve(case.context)
    assert len(case.turns) == (1 if task == "variable_tracking" else 3)
    for turn in case.turns:
        value = re.search(r"value (\d+)", turn.question).group(1)
        assert sorted(turn.answers) == sorted(n for n, v in resolved.items() if v == value)
        assert len(turn.answers) == 5 and turn.metric == "string_match_all"


@pytest.mark.parametrize("length", LENGTHS)
def test_common_words_top10(make_case, length):
    case = make_case("common_words", length)
    entries = re.findall(r"(\d+)\. ([a-z]+)", case.context.split("\n\n", 1)[1])
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    (turn,) = case.turns
    assert len(turn.answers) == 10
    others = [c for w, c in counts.items() if w not in turn.answers]
    assert min(counts[w] for w in turn.answers) > max(others)
    assert {counts[w] for w in turn.answers} == {case.meta["freq_common"]}


@pytest.mark.parametrize("length", LENGTHS)
def test_frequent_words_top3(make_case, length):
    case = make_case("frequent_words", length)
    words = case.context.split("\n\n", 1)[1].split()
    ranked = Counter(words).most_common()
    (turn,) = case.turns
    assert [w for w, _ in ranked[:3]] == turn.answers
    assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]
    assert all(len(w) == 6 for w in words)


@pytest.mark.parametrize("length", LENGTHS)
def test_kv_retrieval_by_json(make_case, length):
    case = make_case("kv_retrieval", length)
    raw = case.context.split("JSON data:\n", 1)[1]
    pairs = json.loads(raw, object_pairs_hook=lambda items: items)
    data = dict(pairs)
    assert len(data) == len(pairs) == case.meta["units"]  # keys are unique
    assert len(case.turns) == 3
    for turn in case.turns:
        key = re.search(r'Key: "([0-9a-f-]{36})"', turn.question).group(1)
        assert turn.answers == [data[key]] and turn.metric == "contains"
        assert case.context.count(key) == 1 and case.context.count(data[key]) == 1


@pytest.mark.parametrize("length", LENGTHS)
def test_prefix_suffix_unique(make_case, length):
    case = make_case("prefix_suffix", length)
    words = case.context.split("\n\n", 1)[1].split()
    assert len(case.turns) == 3
    for turn in case.turns:
        prefix, suffix = re.findall(r'"([a-z]+)"', turn.question)
        assert [w for w in words if w.startswith(prefix) and w.endswith(suffix)] == turn.answers


@pytest.mark.parametrize("length", LENGTHS)
def test_math_find_answers(make_case, length):
    case = make_case("math_find", length)
    numbers = json.loads(case.context.split("\n\n", 1)[1])
    assert len(numbers) == len(set(numbers))
    expected = {
        "largest number": max(numbers), "smallest number": min(numbers),
        "second largest number": sorted(numbers)[-2], "second smallest number": sorted(numbers)[1],
        "difference between the largest and the smallest number": max(numbers) - min(numbers),
    }
    for turn in case.turns:
        what = re.fullmatch(r"What is the (.+) in the list above\?", turn.question).group(1)
        assert turn.answers == [str(expected[what])] and turn.metric == "first_number"


@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_by_seed(tok, make_case, task):
    case = make_case(task, 1000)
    again = TASKS[task].generate(tok, 1000, 7)
    assert again == case
    other = make_case(task, 1000, seed=8)
    assert other.context != case.context
    assert [t.answers for t in other.turns] != [t.answers for t in case.turns]
    assert make_case(task, 1000, index=1).context != case.context


def test_case_json_round_trip(make_case):
    for task in TASKS:
        case = make_case(task, 1000)
        assert Case.from_dict(json.loads(json.dumps(case.to_dict()))) == case


def _needle_fraction(case: Case) -> float:
    """Where the asked needle starts, as a fraction of the haystack (after the instruction)."""
    intro, body = case.context.split("\n\n", 1)
    value = case.turns[0].answers[0]
    needle = next(n for n in case.meta["needles"] if value in n)
    return body.index(needle) / (len(body) - len(needle))


@pytest.mark.parametrize("task", ["niah_single", "niah_single_prose", "niah_multikey"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_depth_places_the_needle(make_case, task, depth):
    case = make_case(task, 2000, depth=depth)
    assert case.depth == depth and case.id.endswith(f"-d{depth:g}")
    assert abs(_needle_fraction(case) - depth) < 0.05
    # a depth sweep keeps the same needle: only its position moves
    assert case.turns == make_case(task, 2000, depth=0.5).turns


def test_depth_drawn_when_not_given(make_case):
    case = make_case("niah_single", 1000)
    assert 0.0 <= case.depth <= 1.0
    assert abs(_needle_fraction(case) - case.depth) < 0.05
    assert make_case("common_words", 1000).depth is None


def test_overrides_and_errors(tok):
    case = generate("multi_hop", tok, 1000, 1, num_turns=5)
    assert len(case.turns) == 5 and len(set(a for t in case.turns for a in t.answers)) == 25
    assert len(generate("math_find", tok, 600, 1, num_turns=5).turns) == 5
    with pytest.raises(InputError, match="num_turns"):
        generate("kv_retrieval", tok, 1000, 1, num_turns=6)
    with pytest.raises(InputError, match="num_keys >= num_turns"):
        generate("niah_multiturn", tok, 1000, 1, num_keys=2)
    assert len(generate("niah_multiturn", tok, 1000, 1, num_keys=5, num_turns=5).turns) == 5
    with pytest.raises(InputError, match="no parameter 'bogus'"):
        generate("kv_retrieval", tok, 1000, 1, bogus=1)
    with pytest.raises(InputError, match="depth"):
        generate("niah_single", tok, 1000, 1, depth=1.5)
    with pytest.raises(InputError, match="target_tokens"):
        generate("niah_single", tok, 0, 1)
    with pytest.raises(ValueError, match="niah_single"):
        get_task("nope")


def test_generation_is_fast(tok):
    for task in TASKS:
        start = time.perf_counter()
        TASKS[task].generate(tok, 4000, 123)
        assert time.perf_counter() - start < 2.0, task  # ~0.1 s typically


def test_fit_units_closest_count():
    count = lambda text: len(text.split())  # noqa: E731
    for target in (1, 7, 100, 1001, 54_321):
        fit = fit_units(lambda n: "w " * (3 * n), count, target)
        assert abs(fit.tokens - target) <= 1 and fit.tokens == count(fit.text)
    assert fit_units(lambda n: "w " * (5 + n), count, 3).units == 0  # overhead alone too big
    assert fit_units(lambda n: "w " * n, count, 100, hi=10).units == 10


def test_corpus_and_haystacks():
    text = prose_text()
    assert 100_000 < len(text.encode()) <= 300_000
    assert "gutenberg" not in text.lower() and "\r" not in text
    assert len(vocabulary()) > 3000
    sentences = split_sentences('Mr. Bennet came. "Is he?" said she! Yes.')
    assert sentences == ["Mr. Bennet came.", '"Is he?" said she!', "Yes."]
    words, _ = prose_words()
    wrapped = "".join(haystack_units("prose", 20, start=len(words) - 10))
    assert wrapped.startswith(words[-10]) and "It is a truth universally" in wrapped
    units = haystack_units("noise", 10)
    assert weave(units, [(0.0, "A."), (1.0, "B.")]).startswith("A. The grass")
    assert weave(units, [(0.0, "A."), (1.0, "B.")]).endswith("again. B.")


@pytest.mark.parametrize("depth", [0.1, 0.9])
def test_passkey_once_at_its_depth_and_answer(tokenizer, depth):
    case = generate("passkey", tokenizer, 2000, 3, depth=depth)
    (key,) = re.findall(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", case.context)
    (turn,) = case.turns
    assert turn.answers == [key] and case.context.count(key) == 2
    assert turn.question == "What is the pass key?" and turn.answer_prefix == "The pass key is"
    where = case.context.index("The pass key is") / len(case.context)
    assert abs(where - depth) < 0.05
    assert "The grass is green." in case.context and case.depth == depth
