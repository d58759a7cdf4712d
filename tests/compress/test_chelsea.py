"""Chelsea cuts the mergeable region into chunks and, within each, merges the even-offset keys
most similar to an odd-offset key into it (bipartite soft matching); every KV head keeps
exactly the budget, sinks and window untouched."""

import pytest
import torch

import kvlab
from kvlab.compress.chelsea import Chelsea
from kvlab.recipe import parse_recipe
from tests.layers import random_layer
from tests.conftest import prefilled, prompt_ids, tiny_engine


LISTED = "chelsea(budget=30, window=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def reference_chunk(keys, values, entries, quota):
    """Soft matching of one chunk of one head with loops: ``keys``/``values`` ``[c, d]`` (keys as
    stored = as attention sees them), ``entries`` their indices. Returns the survivors as a
    list of (entry, key, value)."""
    clusters = [[e, k.clone(), v.clone(), 1.0] for e, k, v in zip(entries, keys, values)]
    while quota:
        a_set, b_set = clusters[0::2], clusters[1::2]
        best = []
        for i, a in enumerate(a_set):
            sims = [float(torch.cosine_similarity(a[1], b[1], dim=0)) for b in b_set]
            j = max(range(len(b_set)), key=lambda j: (sims[j], -j))
            best.append((sims[j], i, j))
        merges = min(quota, len(a_set))
        chosen = sorted(best, key=lambda t: -t[0])[:merges]  # stable: earliest a on ties
        into = {}
        for _, i, j in chosen:
            into.setdefault(j, []).append(a_set[i])
        for j, members in into.items():
            b = b_set[j]
            size = b[3] + sum(m[3] for m in members)
            b[1] = (b[3] * b[1] + sum(m[3] * m[1] for m in members)) / size
            b[2] = (b[3] * b[2] + sum(m[3] * m[2] for m in members)) / size
            b[3] = size
        gone = {id(a_set[i]) for _, i, _ in chosen}
        clusters = [c for c in clusters if id(c) not in gone]
        quota -= merges
    return [(c[0], c[1], c[2]) for c in clusters]


@pytest.mark.parametrize("budget, batch", [
    (43, 1),  # 5 merges per chunk of 16: one round
    (22, 2),  # 12 merges per chunk: a second round on the survivors; each batch row for itself
])
def test_merge_matches_the_reference(budget, batch):
    sink, window, chunk, n = 4, 6, 16, 58  # region: three chunks of 16
    ctx, q = random_layer(n=n, batch=batch, seed=31)
    keys, values = ctx.layer.keys.clone(), ctx.layer.values.clone()
    quota = (n - budget) // 3
    Chelsea(budget=budget, chunk=chunk, window=window, sink=sink).compress(q, ctx)
    for row in range(batch):
        for kv in range(2):
            kept = list(range(sink))
            new_keys, new_values = [keys[row, kv, :sink]], [values[row, kv, :sink]]
            for start in range(sink, n - window, chunk):
                part = range(start, start + chunk)
                for e, k, v in reference_chunk(keys[row, kv, part], values[row, kv, part], part, quota):
                    kept.append(e)
                    new_keys.append(k[None])
                    new_values.append(v[None])
            kept += list(range(n - window, n))
            new_keys.append(keys[row, kv, n - window :])
            new_values.append(values[row, kv, n - window :])
            assert ctx.layer.positions[row, kv].tolist() == kept
            torch.testing.assert_close(ctx.layer.keys[row, kv], torch.cat(new_keys), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ctx.layer.values[row, kv], torch.cat(new_values), rtol=1e-5, atol=1e-5)
    if quota < chunk // 2:  # some even entries stay: which ones depends on each head's keys
        assert not torch.equal(ctx.layer.positions[0, 0], ctx.layer.positions[0, 1])


@pytest.mark.parametrize("n, budget, chunk", [
    (60, 20, 16),   # uneven last chunk
    (300, 20, 16),  # fewer kept region entries (10) than chunks (18): chunks grow
    (60, 8, 16),    # budget below sink + window: sinks, then what is left of the window
])
def test_exact_budget_physical_size_and_untouched_ends(n, budget, chunk):
    ctx, q = random_layer(n=n, batch=2, d=8, seed=32)
    keys, values = ctx.layer.keys.clone(), ctx.layer.values.clone()
    Chelsea(budget=budget, chunk=chunk, window=6, sink=4).compress(q, ctx)
    layer = ctx.layer
    assert layer.positions.shape == (2, 2, budget) and layer.keys.shape == (2, 2, budget, 8)
    assert layer.positions.dtype == torch.int32
    # keys + values fp32, one int32 position per entry and head
    assert layer.nbytes() == 2 * 2 * 2 * budget * 8 * 4 + 2 * 2 * budget * 4
    window = min(6, budget - 4)
    assert layer.positions[..., :4].tolist() == [[list(range(4))] * 2] * 2
    assert layer.positions[..., budget - window :].tolist() == [[list(range(n - window, n))] * 2] * 2
    assert torch.equal(layer.keys[:, :, :4], keys[:, :, :4])
    assert torch.equal(layer.values[:, :, budget - window :], values[:, :, n - window :])
    assert torch.equal(layer.keys[:, :, budget - window :], keys[:, :, n - window :])
    assert (layer.positions.diff(dim=-1) > 0).all()  # sorted, no entry twice


def test_duplicate_keys_merge_first_into_their_mean_value():
    """Three odd entries are exact copies of the even entry before them: with a quota of
    three, exactly those pairs merge (similarity 1), each at the odd entry's position with
    the mean of the two values; every other entry is untouched."""
    ctx, q = random_layer(n=60, seed=33)
    pairs = [10, 24, 40]  # even offsets in the chunk starting at entry 4: entries 14, 28, 44
    for offset in pairs:
        ctx.layer.keys[:, :, 4 + offset + 1] = ctx.layer.keys[:, :, 4 + offset]
    keys, values = ctx.layer.keys.clone(), ctx.layer.values.clone()
    Chelsea(budget=57, chunk=50, window=6, sink=4).compress(q, ctx)
    gone = [4 + offset for offset in pairs]
    kept = [j for j in range(60) if j not in gone]
    assert ctx.layer.positions.tolist() == [[kept, kept]]
    for j in gone:
        slot = kept.index(j + 1)
        torch.testing.assert_close(ctx.layer.keys[:, :, slot], keys[:, :, j + 1])
        torch.testing.assert_close(ctx.layer.values[:, :, slot], values[:, :, j : j + 2].mean(dim=2))
    others = [kept.index(j) for j in kept if j - 1 not in gone]
    assert torch.equal(ctx.layer.values[:, :, others], values[:, :, [kept[s] for s in others]])


def test_engine_halves_the_cache_and_equals_full_with_room():
    engine = tiny_engine()
    ids = prompt_ids(160)
    full = engine.generate_ids(ids, "full", max_new_tokens=6)
    half = engine.generate_ids(ids, "chelsea(budget=0.5)", max_new_tokens=6)
    assert len(half.token_ids) == len(full.token_ids)
    assert half.stats.kv_tokens == 80 + 5  # the budget, then the decoded tokens but the last
    assert 0.45 < half.stats.kv_bytes / full.stats.kv_bytes < 0.6
    roomy = engine.generate_ids(ids, "chelsea(budget=1.0)", max_new_tokens=6)
    assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes


def test_listed_with_paper_and_defaults():
    info = {m.name: m for m in kvlab.methods()}["chelsea"]
    assert info.stage == "compress" and "arXiv:2506.11418" in info.paper and info.summary
    params = {p.name: p.default for p in info.params}
    assert params == {"budget": 0.5, "chunk": 64, "window": 32, "sink": 4}
    assert parse_recipe("chelsea").compress.name == "chelsea"


@pytest.mark.parametrize("text", [
    "chelsea(chunk=1)", "chelsea(chunk=-4)", "chelsea(window=-1)", "chelsea(sink=-2)",
    "chelsea(budget=-3)",
])
def test_bad_parameters_are_refused(text):
    with pytest.raises(kvlab.RecipeError) as info:
        parse_recipe(text)
    assert text in str(info.value)


def test_engine_chunks_start_after_the_sinks_and_every_chunk_keeps_its_odd_offsets():
    """With a quota of at most half a chunk, one round of matching merges only entries at
    even offsets (set A) into odd ones (set B): every odd offset of every chunk stays,
    counted from the first entry after the sinks. Sinks and window keep their keys."""
    from tests.compress.reference import eager_run, head_positions

    n, budget, sink, window, chunk = 120, 70, 4, 8, 16
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids)
    engine = tiny_engine()
    cache = prefilled(engine, f"chelsea(budget={budget}, chunk={chunk}, window={window}, sink={sink})", ids)
    region = range(sink, n - window)  # 108 entries: 6 chunks of 16 and one of 12; 50 removed
    odd = [j for j in region if (j - sink) % chunk % 2 == 1]
    for index, layer in enumerate(cache.layers):
        for h, kept in enumerate(head_positions(layer)):
            assert len(kept) == budget and kept == sorted(set(kept))
            assert kept[:sink] == list(range(sink)) and kept[-window:] == list(range(n - window, n))
            assert set(odd) <= set(kept)
            ends = list(range(sink)) + list(range(budget - window, budget))
            torch.testing.assert_close(
                layer.keys[0, h, ends], run.keys[index][h, [kept[i] for i in ends]], atol=1e-5, rtol=1e-5
            )
