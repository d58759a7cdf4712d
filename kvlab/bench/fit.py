"""Fitting a generated context to a token budget.

RULER (arXiv:2404.06654) binary-searches the number of haystack units (sentences, words,
records) so that a prompt fills the budget. Here ``build(n)`` renders a context from ``n``
units and :func:`fit_units` finds the ``n`` whose token count is closest to the target with a
few whole-text tokenisations: a probe to estimate tokens per unit, a linear extrapolation to
bracket the target, then interpolation search (bisection when interpolation stalls).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

TokenCounter = Callable[[str], int]


def token_counter(tokenizer: Any) -> TokenCounter:
    """``text -> number of tokens`` for a Hugging Face tokenizer, without special tokens."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def count_many(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token counts of several short texts in one (batched) tokenizer call."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@dataclass
class Fit:
    """The chosen number of units, the text it renders and that text's token count."""

    units: int
    text: str
    tokens: int


def fit_units(
    build: Callable[[int], str],
    count: TokenCounter,
    target: int,
    *,
    lo: int = 0,
    hi: int = 50_000_000,
    probe: int = 32,
    slack: float = 0.002,
) -> Fit:
    """The ``n`` in ``[lo, hi]`` whose ``build(n)`` has the token count closest to ``target``.

    The token count of ``build(n)`` must be non-decreasing in ``n`` (up to tokenizer noise).
    The search stops early once a count is within ``slack * target`` tokens (at least 1) of
    the target. When even ``build(lo)`` exceeds the target, ``lo`` is returned.
    """
    texts: dict[int, str] = {}
    counts: dict[int, int] = {}

    def tokens(n: int) -> int:
        if n not in counts:
            texts[n] = build(n)
            counts[n] = count(texts[n])
        return counts[n]

    def result(n: int) -> Fit:
        tokens(n)
        return Fit(n, texts[n], counts[n])

    close = max(1.0, slack * target)
    a = lo
    if tokens(a) >= target or a == hi:
        return result(a)
    b: int | None = None
    n = min(hi, a + probe)
    for _ in range(64):  # bracket: tokens(a) <= target < tokens(b)
        if abs(tokens(n) - target) <= close:
            return result(n)
        if tokens(n) > target:
            b = n
            break
        slope = max((tokens(n) - tokens(a)) / (n - a), 1e-6)
        a = n
        if a == hi:
            return result(hi)
        n = min(hi, a + max(1, math.ceil((target - tokens(a)) / slope)))
    if b is None:
        return result(a)
    stalled = False
    while b - a > 1:
        if stalled:
            n = (a + b) // 2
        else:
            n = a + round((target - tokens(a)) * (b - a) / (tokens(b) - tokens(a)))
            n = min(max(n, a + 1), b - 1)
        width = b - a
        if abs(tokens(n) - target) <= close:
            return result(n)
        if tokens(n) <= target:
            a = n
        else:
            b = n
        stalled = (b - a) * 2 > width
    return result(a if target - tokens(a) <= tokens(b) - target else b)
