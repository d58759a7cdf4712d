"""Engine.decode_step: one decoding step of several sequences in one forward, and Sequence.fork."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.engine.forward import Phase
from kvlab.engine.sampling import Sampling
from tests.conftest import prompt_ids, tiny_model

RECIPES = [
    "full",
    "snapkv(budget=30, window=8)",       # evicted at the end of the context
    "h2o(budget=30)",                    # evicts while decoding (snapshots)
    "adakv(budget=30)",                  # ragged: KV heads stored apart
    "kivi(group=8, residual=16)",        # quantised storage
    "think(ratio=0.5)",                  # pruned key channels
    "quest(budget=16)",                  # a retrieve method's side index
    "self_extend(group_size=4, window=16)",  # keys kept before RoPE, own attention
]
QUESTIONS = [prompt_ids(n, seed=20 + n) for n in (3, 11, 7)]  # different lengths: different positions
STEPS = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def engine():
    return kvlab.Engine(tiny_model(), progress=False, prefill_chunk=64)


def context(engine, recipe):
    sequence = engine.new_sequence(recipe)
    engine.prefill(sequence, prompt_ids(120, seed=8), compress=True)
    return sequence


def alone(engine, stored, question) -> list[int]:
    """Greedy tokens of ``question`` on a fork of ``stored``, with the engine's own loop."""
    sequence = stored.fork()
    logits = engine.prefill(sequence, question, compress=False)
    return engine.decode(sequence, logits, STEPS, Sampling().sampler(engine.device)).tokens


@pytest.mark.parametrize("recipe", RECIPES)
def test_batched_greedy_decoding_is_token_for_token_decoding_alone(engine, recipe):
    stored = context(engine, recipe)
    before = (stored.seen, stored.nbytes(), stored.mean_entries())
    expected = [alone(engine, stored, q) for q in QUESTIONS]
    forks = [stored.fork() for _ in QUESTIONS]
    logits = torch.stack([engine.prefill(f, q, compress=False) for f, q in zip(forks, QUESTIONS)])
    tokens: list[list[int]] = [[] for _ in QUESTIONS]
    forwards = engine.counters.forwards
    for step in range(STEPS):
        drawn = [int(row.argmax()) for row in logits]
        for mine, token in zip(tokens, drawn):
            mine.append(token)
        if step < STEPS - 1:
            logits = engine.decode_step(forks, drawn)
            assert logits.shape == (len(QUESTIONS), engine.config.vocab_size)
    assert tokens == expected
    assert engine.counters.forwards - forwards == STEPS - 1  # one forward per step, not one per sequence
    assert [f.seen for f in forks] == [stored.seen + len(q) + STEPS - 1 for q in QUESTIONS]
    assert (stored.seen, stored.nbytes(), stored.mean_entries()) == before  # the stored context is untouched


def test_forks_of_a_layer_with_a_decoding_reserve_never_write_into_each_other(engine):
    """After a decoding step the layer keeps a reserve; two forks appending different tokens
    must each see only their own (the reserve is not shared)."""
    stored = context(engine, "full")
    engine.forward(stored, [5], Phase.DECODE)
    layer = stored.layers[0]
    assert layer.capacity > layer.num_entries  # a reserve to share, if forks did not drop it
    a, b = stored.fork(), stored.fork()
    engine.forward(a, [7], Phase.DECODE)
    engine.forward(b, [9], Phase.DECODE)
    got = engine.forward(a, [11], Phase.DECODE)
    reference = context(engine, "full")
    for token in (5, 7):
        engine.forward(reference, [token], Phase.DECODE)
    torch.testing.assert_close(got, engine.forward(reference, [11], Phase.DECODE))


def test_a_recipe_that_does_not_batch_is_refused_a_shared_forward(engine, monkeypatch):
    from kvlab.compress.snapkv import SnapKV

    monkeypatch.setattr(SnapKV, "batches_decode", False)
    snap, full = context(engine, "snapkv(budget=30, window=8)"), context(engine, "full")
    assert not snap.recipe.batches_decode and full.recipe.batches_decode
    with pytest.raises(ValueError, match="snapkv.*one sequence per forward"):
        engine.decode_step([snap.fork(), full.fork()], [1, 2])
    assert engine.decode_step([snap.fork()], [1]).shape[0] == 1  # alone it runs


def test_decode_step_checks_its_arguments(engine):
    stored = context(engine, "full")
    with pytest.raises(ValueError, match="2 sequences for 1 tokens"):
        engine.decode_step([stored, stored.fork()], [1])
