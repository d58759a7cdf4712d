"""Fixtures of the benchmark tests: the real SmolLM2 tokenizer (offline) and a case cache."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from transformers import AutoTokenizer

from kvlab.bench.cases import Case
from kvlab.bench.tasks import TASKS
from kvlab.engine.loading import converted_gguf, default_gguf


@pytest.fixture(scope="session")
def tok():
    """SmolLM2's tokenizer from the default model package (converted once, ~40 s on CI)."""
    return AutoTokenizer.from_pretrained(converted_gguf(default_gguf()))


@pytest.fixture(scope="session")
def count(tok) -> Callable[[str], int]:
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="session")
def make_case(tok) -> Callable[..., Case]:
    """``make_case(task, length, seed=7, index=0, depth=None)``, memoised for the session."""
    cache: dict[tuple, Case] = {}

    def make(
        task: str, length: int, seed: int = 7, index: int = 0, depth: float | None = None
    ) -> Case:
        key = (task, length, seed, index, depth)
        if key not in cache:
            cache[key] = TASKS[task].generate(tok, length, seed, index, depth)
        return cache[key]

    return make
