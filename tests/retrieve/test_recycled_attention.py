"""Recycled Attention: a full step every ``stride`` steps, its top entries recycled in between.

The engine tests compare kvlab's teacher-forced decoding log-probabilities with the model
written out (tests/compress/reference.py) whose decoding rows follow the definition with
loops: the first decoding step and every ``stride``-th after it attend densely; per KV head
the ``budget`` entries with the largest attention probability summed over its query heads
are kept; the steps in between attend, per query head, to its KV head's kept entries plus
every token from the full step on.
"""

import pytest
import torch

from kvlab.registry import resolve_budget
from tests.compress.reference import reference_logits, top_indices
from tests.conftest import prompt_ids, tiny_engine

LISTED = "recycled_attention(budget=16, stride=4)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""

SHARP = {"initializer_range": 0.2}
"""Larger random weights than the default: attention peaks, so the top-k has no near ties."""


def recycled_attention(prompt, budget, stride, dense_layers, log):
    """The reference attention; ``log`` collects ``(layer, row, full step?)``."""

    def attention(layer, q, k, v, rope):
        n, d = q.shape[1], q.shape[-1]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        scale = d ** -0.5
        group = q.shape[0] // k.shape[0]
        out = torch.zeros_like(q)
        for i in range(n):
            for h in range(q.shape[0]):
                p = torch.softmax(kr[h // group, : i + 1] @ qr[h, i] * scale, dim=0)
                out[h, i] = p @ v[h // group, : i + 1]
        if layer < dense_layers:
            return out
        kept, full_row = None, None
        for i in range(prompt, n):
            entries = i + 1
            if kept is None or i - full_row >= stride:
                top = resolve_budget(budget, entries)
                log.append((layer, i, True))
                if top >= entries:
                    kept = None
                    continue
                kept, full_row = [], i
                for kv in range(k.shape[0]):
                    votes = torch.zeros(entries)
                    for h in range(kv * group, (kv + 1) * group):
                        votes += torch.softmax(kr[kv, :entries] @ qr[h, i] * scale, dim=0)
                    kept.append(top_indices(votes, top))
                continue  # the full step itself is dense
            log.append((layer, i, False))
            for h in range(q.shape[0]):
                index = kept[h // group] + list(range(full_row + 1, entries))
                p = torch.softmax(kr[h // group, index] @ qr[h, i] * scale, dim=0)
                out[h, i] = p @ v[h // group, index]
        return out

    return attention


def decode_logprobs(recipe, ids, prompt):
    """kvlab's log-probabilities of rows ``prompt - 1 ..``: prompt prefilled, rest teacher-forced."""
    engine = tiny_engine(**SHARP)
    cache = engine.new_sequence(recipe)
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    return engine.teacher_force(cache, logits, ids[prompt:] + [0]), cache


@pytest.mark.parametrize("budget, stride, dense_layers", [(16, 4, 0), (0.2, 3, 1), (24, 1, 0)])
def test_decoding_recycles_the_last_full_steps_top_entries(budget, stride, dense_layers):
    prompt, steps = 97, 10
    ids = prompt_ids(prompt + steps, seed=3)
    log = []
    attention = recycled_attention(prompt, budget, stride, dense_layers, log)
    expected = reference_logits(ids, attention, **SHARP)
    recipe = f"recycled_attention(budget={budget}, stride={stride}, dense_layers={dense_layers})"
    got, _ = decode_logprobs(recipe, ids, prompt)
    torch.testing.assert_close(got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=1e-5, rtol=1e-5)
    full_rows = sorted({i for layer, i, full in log if full})
    assert full_rows == list(range(prompt, prompt + steps, stride))  # the stride
    dense = torch.log_softmax(reference_logits(ids, **SHARP)[prompt:], dim=-1)
    if stride > 1:
        assert not torch.allclose(got[1:], dense, atol=1e-3)
    else:  # every step a full one: dense attention
        torch.testing.assert_close(got[1:], dense, atol=1e-5, rtol=1e-5)


def test_equals_full_when_everything_fits():
    engine = tiny_engine()
    ids = prompt_ids(160)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    for recipe in ("recycled_attention(budget=1.0, stride=4)", "recycled_attention(budget=16, stride=1)",
                   "recycled_attention(budget=16, stride=4, dense_layers=2)"):
        assert engine.generate_ids(ids, recipe, max_new_tokens=8).token_ids == full.token_ids, recipe
    assert engine.generate_ids(ids, LISTED, max_new_tokens=8).token_ids != full.token_ids


def test_recycled_entries_are_counted_and_the_cache_kept_whole():
    """Each non-dense layer keeps the recycled entries (int64 ``[kv_heads, k]``)."""
    prompt, kv_heads, k = 97, 2, 16
    ids = prompt_ids(prompt + 5, seed=3)
    engine = tiny_engine()
    caches = []
    for recipe in ("full", "recycled_attention(budget=16, stride=4, dense_layers=1)"):
        cache = engine.new_sequence(recipe)
        logits = engine.prefill(cache, ids[:prompt], compress=True)
        engine.teacher_force(cache, logits, ids[prompt:] + [0])
        caches.append(cache)
    full, recycled = caches
    assert recycled.nbytes() - full.nbytes() == kv_heads * k * 8
    assert [layer.num_entries for layer in recycled.layers] == [prompt + 5] * 2
