"""KVMerger merges runs of similar neighbouring keys at their most attended member with
Gaussian kernel weights, then evicts by score; every KV head keeps exactly the budget."""

import math

import pytest
import torch

import kvlab
from kvlab.compress.kvmerger import KVMerger
from kvlab.compress.snapkv import SnapKV
from kvlab.recipe import parse_recipe
from tests.layers import probs_of, random_layer, rotary
from tests.conftest import prefilled, prompt_ids, tiny_engine


LISTED = "kvmerger(budget=30, window=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


ENTRY_BYTES = 2 * 2 * 16 * 4  # keys + values, 2 KV heads, head_dim 16, fp32 (tiny model)


def reference(q, keys, values, budget, window, threshold, sigma):
    """KVMerger written out with loops, per batch row and KV head: votes (SnapKV, no
    smoothing, mean over the query heads), links between neighbours above the threshold (at
    most n - budget, the most similar), runs, pivots, Gaussian weights, then the top-scored sets.
    Returns (positions, keys, values) of the kept entries as nested lists / tensors."""
    b, hq, n, d = q.shape
    hk = keys.shape[1]
    rot = rotary(d)
    prefix, choose, most = n - window, budget - window, n - budget
    positions, new_keys, new_values = [], torch.zeros(b, hk, budget, d), torch.zeros(b, hk, budget, d)
    for row in range(b):
        positions.append([])
        for kv in range(hk):
            votes = torch.zeros(prefix)
            for h in range(kv * hq // hk, (kv + 1) * hq // hk):
                for pos in range(prefix, n):
                    votes += probs_of(q[row, h, pos], pos, keys[row, kv], rot)[:prefix]
            votes /= hq // hk
            k, v = keys[row, kv, :prefix], values[row, kv, :prefix]
            sims = [float(torch.cosine_similarity(k[j + 1], k[j], dim=0)) for j in range(prefix - 1)]
            links = [j for j in range(prefix - 1) if sims[j] > threshold]
            links = set(sorted(links, key=lambda j: -sims[j])[:most])
            sets, current = [], [0]
            for j in range(1, prefix):
                if j - 1 in links:
                    current.append(j)
                else:
                    sets.append(current)
                    current = [j]
            sets.append(current)
            merged = []
            for members in sets:
                pivot = max(members, key=lambda j: (float(votes[j]), -j))
                dist = [float((k[pivot] - k[j]).square().sum()) for j in members]
                others = [x for j, x in zip(members, dist) if j != pivot]
                width = 2 * sigma**2 if sigma else 2 * (sum(others) / max(1, len(others)))
                g = torch.tensor([math.exp(-x / width) if x > 0 else 1.0 for x in dist])
                g = g / g.sum()
                merged.append((
                    float(votes[members].sum()), pivot,
                    (g[:, None] * k[members]).sum(0), (g[:, None] * v[members]).sum(0),
                ))
            best = sorted(range(len(merged)), key=lambda s: -merged[s][0])[:choose]
            chosen = [merged[s] for s in sorted(best)]
            positions[row].append([c[1] for c in chosen] + list(range(prefix, n)))
            new_keys[row, kv] = torch.cat([torch.stack([c[2] for c in chosen]), keys[row, kv, prefix:]])
            new_values[row, kv] = torch.cat([torch.stack([c[3] for c in chosen]), values[row, kv, prefix:]])
    return positions, new_keys, new_values


def runs_of_similar_keys(ctx):
    """Make a few runs of nearly parallel neighbouring keys, different in each head."""
    keys = ctx.layer.keys
    g = torch.Generator().manual_seed(5)
    for head, runs in ((0, [(10, 15), (20, 22)]), (1, [(30, 34), (40, 42), (44, 47)])):
        for start, end in runs:
            base = keys[:, head, start].clone()
            for j in range(start + 1, end):
                keys[:, head, j] = base * (1 + 0.3 * torch.rand(1, generator=g)) + 0.1 * torch.randn(
                    base.shape, generator=g
                )


@pytest.mark.parametrize("threshold, sigma, batch", [
    (0.9, 0.0, 1),   # few links: merge every run, then evict the lowest-scored entries
    (0.9, 0.7, 2),   # a fixed kernel width; each batch row for itself
    (-1.0, 0.0, 1),  # every neighbour similar enough: the n - budget most similar links only
])
def test_merge_matches_the_reference(threshold, sigma, batch):
    ctx, q = random_layer(n=60, batch=batch, seed=21)
    runs_of_similar_keys(ctx)
    keys, values = ctx.layer.keys.clone(), ctx.layer.values.clone()
    positions, new_keys, new_values = reference(q, keys, values, 30, 6, threshold, sigma)
    KVMerger(budget=30, window=6, threshold=threshold, sigma=sigma).compress(q, ctx)
    assert ctx.layer.positions.tolist() == positions
    torch.testing.assert_close(ctx.layer.keys, new_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx.layer.values, new_values, rtol=1e-5, atol=1e-5)
    assert positions[0][0] != positions[0][1]  # each head merges its own runs


def test_duplicate_keys_collapse_to_their_mean_value():
    """Four equal keys draw equal attention: one entry (the first: ties go to the earliest)
    holds the key and the mean of their values; the budget needs exactly these three merges."""
    ctx, q = random_layer(n=60, seed=22)
    ctx.layer.keys[:, :, 11:14] = ctx.layer.keys[:, :, 10:11]
    keys, values = ctx.layer.keys.clone(), ctx.layer.values.clone()
    KVMerger(budget=57, window=6, threshold=0.99).compress(q, ctx)
    kept = [j for j in range(60) if j not in (11, 12, 13)]
    assert ctx.layer.positions.tolist() == [[kept, kept]]
    torch.testing.assert_close(ctx.layer.keys[:, :, 10], keys[:, :, 10])
    torch.testing.assert_close(ctx.layer.values[:, :, 10], values[:, :, 10:14].mean(dim=2))
    torch.testing.assert_close(ctx.layer.values[:, :, 11:], values[:, :, 14:])


def test_without_similar_keys_it_is_snapkv_without_smoothing():
    ctx, q = random_layer(n=60, seed=23)
    twin, _ = random_layer(n=60, seed=23)
    KVMerger(budget=20, window=6, threshold=1.0).compress(q, ctx)
    SnapKV(budget=20, window=6, kernel=1).compress(q, twin)
    assert torch.equal(ctx.layer.positions, twin.layer.positions)
    assert torch.equal(ctx.layer.keys, twin.layer.keys)
    assert torch.equal(ctx.layer.values, twin.layer.values)


def test_physical_size_in_the_engine():
    engine = tiny_engine()
    ids = prompt_ids(160)
    recipe = "kvmerger(budget=40, window=8, threshold=-1.0)"
    cache = prefilled(engine, recipe, ids)
    base = prefilled(engine, "snapkv(budget=40, window=8, kernel=1)", ids)
    for layer in cache.layers:
        assert layer.positions.shape == (1, 2, 40)  # the same count in every head
        assert layer.positions[0, :, -8:].tolist() == [list(range(152, 160))] * 2
    assert not torch.equal(cache.layers[0].keys, base.layers[0].keys)  # merged, not evicted
    stats = engine.generate_ids(ids, recipe, max_new_tokens=1).stats
    # keys + values of 40 entries per head and an int32 position per head and entry
    assert stats.kv_tokens == 40 and stats.kv_bytes == 2 * 40 * (ENTRY_BYTES + 2 * 4)


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    for recipe in ("kvmerger(budget=1.0)", "kvmerger(budget=100, threshold=-1.0)"):
        roomy = engine.generate_ids(ids, recipe, max_new_tokens=8)
        assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes


def test_listed_with_paper_and_defaults():
    info = {m.name: m for m in kvlab.methods()}["kvmerger"]
    assert info.stage == "compress" and "arXiv:2407.08454" in info.paper and info.summary
    params = {p.name: p for p in info.params}
    assert {k: params[k].default for k in params} == {
        "budget": 0.5, "threshold": 0.8, "sigma": 0.0, "window": 32, "kernel": 1,
        "pooling": "avg", "gqa_reduce": "mean",
    }
    assert all(p.help for p in info.params)
    assert parse_recipe("kvmerger").compress.name == "kvmerger"
    with pytest.raises(kvlab.RecipeError, match="<= 1.0"):
        parse_recipe("kvmerger(threshold=1.5)")
    with pytest.raises(kvlab.RecipeError, match="odd"):
        parse_recipe("kvmerger(kernel=2)")


def test_engine_without_links_evicts_as_snapkv_and_always_keeps_the_window():
    from tests.compress.reference import eager_run, head_positions
    from tests.compress.test_snapkv import assert_top_plus_window, engine_votes

    n, budget, window = 120, 40, 8
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids)
    engine = tiny_engine()
    unlinked = engine.new_sequence(f"kvmerger(budget={budget}, window={window}, threshold=1.0)")
    merging = engine.new_sequence(f"kvmerger(budget={budget}, window={window}, threshold=0.0)")
    for cache in (unlinked, merging):
        engine.prefill(cache, ids, compress=True)
    for index, (plain, merged) in enumerate(zip(unlinked.layers, merging.layers)):
        votes = engine_votes(run, index, window, 1)
        assert_top_plus_window(head_positions(plain), votes, budget, window, n)
        for h, kept in enumerate(head_positions(merged)):
            assert len(kept) == budget and kept[-window:] == list(range(n - window, n))
            torch.testing.assert_close(  # the window is never merged
                merged.values[0, h, -window:], run.values[index][h, -window:], atol=1e-5, rtol=1e-5
            )
        assert not torch.allclose(merged.values, plain.values)
