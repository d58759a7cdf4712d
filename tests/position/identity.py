"""Shared check of the position tests: a method whose parameters make it the identity gives
``full``'s logits on a tiny model, over a chunked prefill and teacher-forced decoding steps."""

from __future__ import annotations

import torch

from tests.conftest import prompt_ids, tiny_engine


def logprobs(engine, recipe: str, ids: list[int], prompt: int) -> torch.Tensor:
    """Log-probabilities ``[len(ids) - prompt + 1, vocab]``: the prompt's last row (chunked
    prefill of ``ids[:prompt]``), then one row per teacher-forced decoding step."""
    cache = engine.new_sequence(recipe)
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    return engine.teacher_force(cache, logits, ids[prompt:] + [0])


def assert_equals_full(recipe: str, prompt: int = 100, steps: int = 6, **overrides) -> None:
    engine = tiny_engine(**overrides)
    engine.prefill_chunk = 32  # several prefill chunks
    ids = prompt_ids(prompt + steps, seed=3)
    torch.testing.assert_close(
        logprobs(engine, recipe, ids, prompt), logprobs(engine, "full", ids, prompt), atol=1e-5, rtol=1e-5
    )


def assert_differs_from_full(recipe: str, prompt: int = 100, steps: int = 6, **overrides) -> None:
    engine = tiny_engine(**overrides)
    engine.prefill_chunk = 32
    ids = prompt_ids(prompt + steps, seed=3)
    assert not torch.allclose(logprobs(engine, recipe, ids, prompt), logprobs(engine, "full", ids, prompt), atol=1e-3)
