"""Metrics: string_match_all / _part, contains, first_number, and unknown names."""

from __future__ import annotations

import pytest

from kvlab.bench.metrics import METRICS, score


def test_string_match_all_fraction_case_insensitive():
    assert score("string_match_all", "The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert score("string_match_all", "Only 123 here", ["123", "456", "789", "000"]) == 0.25
    assert score("string_match_all", "ALPHA beta", ["alpha", "Beta"]) == 1.0
    assert score("string_match_all", "nothing", ["x1"]) == 0.0
    assert score("string_match_all", "anything", []) == 0.0


def test_string_match_part_and_contains():
    assert score("string_match_part", "It was Paris, I think", ["London", "paris"]) == 1.0
    assert score("string_match_part", "Rome", ["London", "Paris"]) == 0.0
    value = "5b1d2a6e-1f0c-4a8e-9d2b-3c4e5f607182"
    assert score("contains", f"The value is: {value.upper()}.", [value]) == 1.0
    assert score("contains", "The value is: 5b1d2a6e", [value]) == 0.0


def test_first_number():
    assert score("first_number", "The largest number is 98765, then 5.", ["98765"]) == 1.0
    assert score("first_number", "The answer: 5 (not 98765)", ["98765"]) == 0.0
    assert score("first_number", "It is -12.", ["-12"]) == 1.0
    assert score("first_number", "about 3.50 units", ["3.5"]) == 1.0
    assert score("first_number", "12,345", ["12,345"]) == 0.0  # the first number is 12
    assert score("first_number", "12345 exactly", ["12,345"]) == 1.0
    assert score("first_number", "no digits", ["1"]) == 0.0


def test_scores_are_in_unit_interval():
    for name in METRICS:
        for pred in ("", "1 2 3", "abc 42"):
            assert 0.0 <= score(name, pred, ["42", "abc"]) <= 1.0


def test_unknown_metric_names_allowed():
    with pytest.raises(ValueError, match="unknown metric 'f1'.*first_number.*string_match_all"):
        score("f1", "a", ["a"])
