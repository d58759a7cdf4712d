"""TokenSelect: soft voting of all query heads, one top-k per layer, contiguous positions.

The engine tests compare kvlab's teacher-forced decoding log-probabilities with the model
written out (tests/compress/reference.py) whose decoding rows follow the paper's definition
with loops: candidates ``j`` in ``[n_init, n - n_local)``, votes
``S_j = sum_h softmax_j(q_h . k_j / sqrt(d))`` (RoPE at the original positions, as kvlab
scores), the top ``budget`` shared by all heads, attention over ``[0, n_init)`` + top +
last ``n_local`` with the keys and the query re-rotated at positions ``0 .. m-1`` (query at
``m - 1``, its own key's position).
"""

import pytest
import torch

from kvlab.registry import resolve_budget
from tests.compress.reference import reference_logits, top_indices
from tests.conftest import prompt_ids, tiny_engine

LISTED = "tokenselect(budget=16, n_init=4, n_local=16)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""

SHARP = {"initializer_range": 0.2}
"""Larger random weights than the default: attention peaks, so the votes have no near ties."""


def tokenselect_attention(prompt, budget, n_init, n_local, dense_layers, threshold, log):
    """The reference attention; ``log`` collects ``(layer, row, chosen, reused)``."""

    def attention(layer, q, k, v, rope):
        n, d = q.shape[1], q.shape[-1]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        scale = d ** -0.5
        group = q.shape[0] // k.shape[0]
        out = torch.softmax(
            (qr @ kr.repeat_interleave(group, 0).transpose(1, 2) * scale).masked_fill(
                torch.arange(n)[None, :] > torch.arange(n)[:, None], float("-inf")
            ), dim=-1,
        ) @ v.repeat_interleave(group, 0)
        if layer < dense_layers:
            return out
        previous = None  # (mean query, chosen)
        for i in range(prompt, n):
            entries = i + 1
            top = resolve_budget(budget, entries)
            if n_init + top + n_local >= entries:
                continue
            mean_query = q[:, i].mean(0)
            reused = False
            if threshold > 0 and previous is not None:
                cos = torch.dot(mean_query, previous[0]) / (mean_query.norm() * previous[0].norm())
                assert abs(float(cos) - threshold) > 1e-4, "near tie at the threshold"
                reused = float(cos) >= threshold
            if reused:
                chosen = previous[1]
            else:
                candidates = list(range(n_init, entries - n_local))
                votes = torch.zeros(len(candidates))
                for h in range(q.shape[0]):
                    logits = torch.stack([qr[h, i] @ kr[h // group, j] * scale for j in candidates])
                    votes += torch.softmax(logits, dim=0)
                chosen = [candidates[c] for c in top_indices(votes, top)]
            previous = (mean_query, chosen)
            log.append((layer, i, chosen, reused))
            index = list(range(n_init)) + chosen + list(range(entries - n_local, entries))
            m = len(index)
            for h in range(q.shape[0]):
                qh = rope(q[h : h + 1, i : i + 1], torch.tensor([m - 1]))[0, 0]
                keys = rope(k[h // group : h // group + 1, index], torch.arange(m))[0]
                p = torch.softmax(keys @ qh * scale, dim=0)
                out[h, i] = p @ v[h // group, index]
        return out

    return attention


def decode_logprobs(recipe, ids, prompt):
    """kvlab's log-probabilities of rows ``prompt - 1 ..``: prompt prefilled, rest teacher-forced."""
    engine = tiny_engine(**SHARP)
    cache = engine.new_sequence(recipe)
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    return engine.teacher_force(cache, logits, ids[prompt:] + [0]), cache


@pytest.mark.parametrize(
    "budget, n_init, n_local, dense_layers",
    [(16, 4, 16, 0), (0.25, 8, 8, 1), (24, 0, 1, 0)],
)
def test_decoding_follows_the_soft_vote_at_contiguous_positions(budget, n_init, n_local, dense_layers):
    prompt, steps = 97, 9
    ids = prompt_ids(prompt + steps, seed=3)
    log = []
    attention = tokenselect_attention(prompt, budget, n_init, n_local, dense_layers, 0.0, log)
    expected = reference_logits(ids, attention, **SHARP)
    recipe = f"tokenselect(budget={budget}, n_init={n_init}, n_local={n_local}, dense_layers={dense_layers})"
    got, _ = decode_logprobs(recipe, ids, prompt)
    torch.testing.assert_close(got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=1e-5, rtol=1e-5)
    assert {layer for layer, *_ in log} == set(range(dense_layers, 2))
    dense = torch.log_softmax(reference_logits(ids, **SHARP)[prompt:], dim=-1)
    assert not torch.allclose(got[1:], dense, atol=1e-3)


def test_selection_cache_reuses_the_previous_indices_when_the_query_barely_moves():
    prompt, steps, threshold = 97, 12, 0.3
    ids = prompt_ids(prompt + steps, seed=3)
    log = []
    attention = tokenselect_attention(prompt, 16, 4, 16, 0, threshold, log)
    expected = reference_logits(ids, attention, **SHARP)
    got, _ = decode_logprobs(f"tokenselect(budget=16, n_init=4, n_local=16, selection_cache={threshold})", ids, prompt)
    torch.testing.assert_close(got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=1e-5, rtol=1e-5)
    reused = [r for *_, r in log]
    assert any(reused) and not all(reused), reused  # both branches taken
    off, _ = decode_logprobs("tokenselect(budget=16, n_init=4, n_local=16)", ids, prompt)
    assert not torch.allclose(got, off, atol=1e-4)  # reuse changed what was attended


def test_equals_full_when_everything_fits():
    engine = tiny_engine()
    ids = prompt_ids(160)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    for recipe in ("tokenselect(budget=1.0)", "tokenselect(budget=16, n_init=64, n_local=128)",
                   "tokenselect(budget=8, n_init=4, n_local=8, dense_layers=2)"):
        assert engine.generate_ids(ids, recipe, max_new_tokens=8).token_ids == full.token_ids, recipe
    sparse = engine.generate_ids(ids, LISTED, max_new_tokens=8)
    assert sparse.token_ids != full.token_ids


def test_selection_cache_bytes_and_the_cache_kept_whole():
    """With the selection cache on, each layer keeps the previous mean query (fp32 ``[d]``)
    and the selected entries (int64 ``[k]``); without it nothing beyond the full cache."""
    prompt, d, k = 97, 16, 16
    ids = prompt_ids(prompt + 4, seed=3)
    engine = tiny_engine()
    caches = {}
    for recipe in ("full", "tokenselect(budget=16, n_init=4, n_local=16)",
                   "tokenselect(budget=16, n_init=4, n_local=16, selection_cache=0.9)"):
        cache = caches[recipe] = engine.new_sequence(recipe)
        logits = engine.prefill(cache, ids[:prompt], compress=True)
        engine.teacher_force(cache, logits, ids[prompt:] + [0])
    full, plain, cached = caches.values()
    assert plain.nbytes() == full.nbytes()
    assert cached.nbytes() - full.nbytes() == 2 * (d * 4 + k * 8)
    assert [layer.num_entries for layer in cached.layers] == [prompt + 4] * 2
