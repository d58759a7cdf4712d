"""Scoring a prediction against gold answers, as RULER and SCBench do.

- ``string_match_all`` (RULER, arXiv:2404.06654): the fraction of references found in the
  prediction, case-insensitively; used for NIAH, variable tracking, common/frequent words.
- ``string_match_part`` (RULER's QA metric): 1 if any reference is found, else 0.
- ``contains``: alias of ``string_match_part``; SCBench's ``label in pred`` for kv retrieval and
  prefix-suffix (arXiv:2412.10319).
- ``first_number`` (SCBench's math_find): 1 if the first number in the prediction equals a
  reference numerically.

Every score lies in [0, 1]; a turn with no reference answers scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from kvlab.errors import InputError

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` that occur in ``prediction`` (case-insensitive)."""
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1.0 if any of ``answers`` occurs in ``prediction`` (case-insensitive), else 0.0."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


def _as_number(text: str) -> float | None:
    """The first number in a reference (thousands separators ignored), or None."""
    match = _NUMBER.search(text.replace(",", ""))
    return float(match.group()) if match else None


def first_number(prediction: str, answers: list[str]) -> float:
    """1.0 if the first number in ``prediction`` equals (numerically) one of ``answers``."""
    match = _NUMBER.search(prediction)
    if match is None:
        return 0.0
    value = float(match.group())
    return float(any(_as_number(a) == value for a in answers))


METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "contains": string_match_part,
    "first_number": first_number,
}


def score(metric: str, prediction: str, answers: list[str]) -> float:
    """Score ``prediction`` against ``answers`` with the metric named ``metric``, in [0, 1]."""
    fn = METRICS.get(metric)
    if fn is None:
        raise InputError(f"unknown metric {metric!r}: use one of {', '.join(sorted(METRICS))}")
    return fn(prediction, list(answers))
