"""Expected Attention keeps the entries that future queries, modelled as a Gaussian fitted to
the prompt's queries and rotated to the next positions, are expected to attend to most."""

import math

import pytest
import torch

from tests.layers import random_layer, rotary
from tests.conftest import prefilled, prompt_ids, tiny_engine
from kvlab.compress.expected_attention import ExpectedAttention, QueryMoments


LISTED = "expected_attention(budget=30)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def rope_matrix(inv_freq, position):
    """RoPE at ``position`` as a d x d matrix (transformers' layout: channel i pairs i + d/2)."""
    half = inv_freq.shape[0]
    r = torch.zeros(2 * half, 2 * half)
    for i in range(half):
        c, s = math.cos(position * inv_freq[i]), math.sin(position * inv_freq[i])
        r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
    return r


def reference_keep(q, keys, values, budget, sink, future, covariance, value_norm, epsilon):
    n, hq, hk, d = keys.shape[2], q.shape[1], keys.shape[1], q.shape[-1]
    inv_freq = rotary(d).inv_freq
    rotation = sum(rope_matrix(inv_freq, p) for p in range(n, n + future)) / future
    kept = []
    for kv in range(hk):
        heads = []
        for h in range(kv * hq // hk, (kv + 1) * hq // hk):
            sample = q[0, h, sink:]  # queries at positions >= sink
            mu = sample.mean(0)
            sigma = (sample - mu).T @ (sample - mu) / sample.shape[0]
            mu, sigma = rotation @ mu, rotation @ sigma @ rotation.T
            logits = torch.tensor([
                float(mu @ keys[0, kv, j]) / math.sqrt(d)
                + (float(keys[0, kv, j] @ sigma @ keys[0, kv, j]) / (2 * d) if covariance else 0.0)
                for j in range(sink, n)
            ])
            heads.append(torch.softmax(logits, dim=0))
        score = torch.stack(heads).mean(0)
        if value_norm:
            score = (score + epsilon) * values[0, kv, sink:].norm(dim=-1)
        top = (score.topk(budget - sink).indices + sink).tolist()
        kept.append(sorted(list(range(sink)) + top))
    return kept


@pytest.mark.parametrize("sink, future, covariance, value_norm, epsilon", [
    (4, 16, True, True, 0.0), (0, 1, True, False, 0.0), (2, 64, False, True, 0.01),
])
def test_keep_matches_the_reference(sink, future, covariance, value_norm, epsilon):
    ctx, q = random_layer(n=50, seed=11)
    q = q + torch.randn(1, 4, 1, 8)  # queries share a direction per head, as in real models
    keys_before, values = ctx.layer.keys.clone(), ctx.layer.values.clone()
    expected = reference_keep(
        q, keys_before, values, 16, sink, future, covariance, value_norm, epsilon
    )
    method = ExpectedAttention(
        budget=16, sink=sink, future=future, covariance=covariance, value_norm=value_norm,
        epsilon=epsilon,
    )
    method.compress(q, ctx)
    assert ctx.layer.positions[0].tolist() == expected
    for h in range(2):
        torch.testing.assert_close(ctx.layer.keys[0, h], keys_before[0, h, expected[h]])


def test_scores_are_the_attention_of_gaussian_future_queries():
    """Many queries drawn from a Gaussian: the closed form matches the attention the same
    queries, placed at the next position, actually pay (the paper's defining identity)."""
    torch.manual_seed(12)
    ctx, _ = random_layer(n=20, kv_heads=1, query_heads=1, seed=12)
    mix = torch.randn(8, 8) / 3
    q = (torch.randn(20000, 8) @ mix + torch.randn(8))[None, None]  # [1, 1, t, d]
    ctx.positions = torch.arange(q.shape[2])
    method = ExpectedAttention(budget=10, sink=0, future=1, value_norm=False)
    predicted = method.score(method.statistics(q, ctx), ctx, sink=0, query_heads=1)[0, 0]
    future_q = rotary(8).rotate(q, torch.full((q.shape[2],), 20))[0, 0]
    observed = torch.exp(future_q @ ctx.layer.keys[0, 0].T / math.sqrt(8)).mean(0)
    torch.testing.assert_close(predicted, observed / observed.sum(), rtol=0.03, atol=1e-4)
    mean_only = ExpectedAttention(budget=10, sink=0, future=1, value_norm=False, covariance=False)
    mean_scores = mean_only.score(mean_only.statistics(q, ctx), ctx, sink=0, query_heads=1)
    assert not torch.allclose(mean_scores[0, 0], predicted, rtol=0.03)


def test_sinks_are_kept_and_the_size_is_physical_in_the_engine():
    engine = tiny_engine()
    ids = prompt_ids(160)
    cache = prefilled(engine, "expected_attention(budget=40)", ids)
    for layer in cache.layers:
        assert layer.positions.shape == (1, 2, 40)
        for head in layer.positions[0].tolist():
            assert head[:4] == [0, 1, 2, 3]
    whole = engine.generate_ids(ids, "full", max_new_tokens=1).stats.kv_bytes
    small = engine.generate_ids(ids, "expected_attention(budget=0.25)", max_new_tokens=1).stats
    assert small.kv_bytes == whole * 40 // 160 + 2 * (2 * 40) * 4  # + int32 positions per head


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    roomy = engine.generate_ids(ids, "expected_attention(budget=100)", max_new_tokens=8)
    assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes


def test_statistics_cover_every_prefill_chunk():
    """A prompt prefilled in three chunks is summarised whole: the same entries are kept as
    with one chunk, and the query moments are dropped once the layer is compressed."""
    engine = tiny_engine()
    ids = prompt_ids(160)
    recipe = "expected_attention(budget=40)"
    whole = prefilled(engine, recipe, ids)
    engine.prefill_chunk = 64
    chunked = prefilled(engine, recipe, ids)
    for one, three in zip(whole.layers, chunked.layers):
        assert torch.equal(one.positions, three.positions)
        assert not three.side  # nothing left behind (no bytes counted after compression)
    _, q = random_layer(n=160, seed=3)
    moments = QueryMoments()
    moments.add(q[:, :, 4:])
    mean, cov = moments.statistics()
    ref_mean, ref_cov = q[:, :, 4:].mean(dim=2), torch.cov(q[0, 0, 4:].T, correction=0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(cov[0, 0], ref_cov, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n, seed, budget, sink, init", [
    (100, 2, 30, 4, 0.02), (40, 3, 30, 12, 0.02), (100, 2, 30, 4, 0.2),
])
def test_engine_keeps_the_sinks_and_the_top_expected_attention_of_the_eager_queries(
    n, seed, budget, sink, init
):
    """Through the engine, against the eager model: per query head the mean and covariance
    of the prompt's queries after the sinks, moved by the mean RoPE rotation of the next
    ``future`` positions (built from the model's own RoPE as d x d matrices), the softmax
    of ``s mu'.k + s^2 k^T Sigma' k / 2`` over the entries after the sinks, averaged over
    the query heads of each KV head, times ``||v||``; the sinks always kept. (With 12 sinks
    of 40 entries, statistics that wrongly include the sinks' queries change the kept set.)"""
    from tests.compress.reference import Rope, assert_top_k, eager_run, head_positions
    from tests.conftest import tiny_model

    future = 32
    ids = prompt_ids(n, seed=seed)
    run = eager_run(ids, initializer_range=init)
    d = run.keys[0].shape[-1]
    rope = Rope(tiny_model(initializer_range=init))
    eye = torch.eye(d)[None].expand(future, d, d).reshape(1, future * d, d)
    positions = torch.arange(n, n + future).repeat_interleave(d)
    rotation = rope(eye, positions)[0].reshape(future, d, d).transpose(1, 2).mean(0)  # mean R_p
    engine = tiny_engine(initializer_range=init)
    cache = prefilled(engine, f"expected_attention(budget={budget}, sink={sink}, future={future})", ids)
    s = d**-0.5
    for index, layer in enumerate(cache.layers):
        keys, values = run.keys[index][:, sink:], run.values[index][:, sink:]
        per_head = []
        for h, queries in enumerate(run.queries[index]):
            sample = queries[sink:].double()
            mu = sample.mean(0)
            sigma = (sample - mu).T @ (sample - mu) / sample.shape[0]
            mu, sigma = rotation.double() @ mu, rotation.double() @ sigma @ rotation.double().T
            k = keys[h // run.group].double()
            logits = s * k @ mu + s * s / 2 * ((k @ sigma) * k).sum(-1)
            per_head.append(torch.softmax(logits, dim=0))
        scores = run.grouped(torch.stack(per_head)) * values.double().norm(dim=-1)
        for kept, head_scores in zip(head_positions(layer), scores):
            assert kept[:sink] == list(range(sink))
            assert_top_k([j - sink for j in kept[sink:]], head_scores, budget - sink, tol=1e-6)
