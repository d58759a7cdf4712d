"""CaM evicts as SnapKV does and folds evicted values into the next kept entries, at random
with a probability set by attention; keys are never changed."""

from dataclasses import dataclass

import pytest
import torch

import kvlab
from kvlab.compress.cam import CaM
from kvlab.compress.snapkv import SnapKV
from kvlab.recipe import Recipe, parse_recipe
from tests.layers import probs_of, random_layer, rotary
from tests.compress.test_snapkv import reference_keep as snapkv_keep
from tests.conftest import prefilled, prompt_ids, tiny_engine


LISTED = "cam(budget=30, window=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


ENTRY_BYTES = 2 * 2 * 16 * 4  # keys + values, 2 KV heads, head_dim 16, fp32 (tiny model)


@dataclass(frozen=True)
class NeverMerge(CaM):
    def merge_probability(self, attention, keep, ctx):
        return torch.zeros_like(attention)


@dataclass(frozen=True)
class AlwaysMerge(CaM):
    def merge_probability(self, attention, keep, ctx):
        return torch.ones_like(attention)


def reference_values(q, keys, values, kept, window, merge, seed, layer, layers, always=False):
    """CaM written out with loops: for each KV head and evicted entry j, the attention of every
    entry (mean over the window queries that see it and the head's query heads), the mean
    attention of j's next ``merge`` kept entries, p = clamp(ratio, 0, 1), the seeded draw, and
    v_j / merge added to each receiver. Returns the kept values ``[b, kv_heads, k, d]``."""
    b, hq, n, d = q.shape
    hk = keys.shape[1]
    rot = rotary(d)
    draws = torch.rand(b, hk, n, generator=torch.Generator().manual_seed(seed * layers + layer))
    out = torch.zeros(b, hk, len(kept[0][0]), d)
    merged = 0
    for row in range(b):
        for kv in range(hk):
            attention = torch.zeros(n)
            for h in range(kv * hq // hk, (kv + 1) * hq // hk):
                for pos in range(n - window, n):
                    attention += probs_of(q[row, h, pos], pos, keys[row, kv], rot)
            seen = torch.tensor([min(window, n - j) for j in range(n)], dtype=torch.float)
            attention = attention / (hq // hk) / seen
            keep = kept[row][kv]
            new = values[row, kv, keep].clone()
            for j in range(n):
                if j in keep:
                    continue
                slots = [i for i, kj in enumerate(keep) if kj > j][:merge]
                reference = attention[[keep[i] for i in slots]].mean()
                p = 1.0 if always else float((attention[j] / reference).clamp(0, 1))
                if draws[row, kv, j] < p:
                    merged += 1
                    for i in slots:
                        new[i] += values[row, kv, j] / merge
            out[row, kv] = new
    return out, merged


@pytest.mark.parametrize("merge, batch, always", [(4, 1, False), (8, 1, False), (4, 2, False), (5, 1, True)])
def test_merges_match_the_reference(merge, batch, always):
    ctx, q = random_layer(n=60, batch=batch, seed=11, index=1, num_layers=3)
    keys, values = ctx.layer.keys.clone(), ctx.layer.values.clone()
    kept = [
        snapkv_keep(q[row : row + 1], keys[row : row + 1], rotary(8), 20, 6, 3, "avg", "mean")
        for row in range(batch)
    ]
    expected, merged = reference_values(q, keys, values, kept, 6, merge, 7, 1, 3, always)
    method = (AlwaysMerge if always else CaM)(budget=20, window=6, kernel=3, merge=merge, seed=7)
    method.compress(q, ctx)
    assert 0 < merged < batch * 2 * 40 or always  # some evicted entries merge, some do not
    assert ctx.layer.positions.tolist() == kept  # SnapKV's choice
    index = torch.tensor(kept)[..., None].expand(-1, -1, -1, 8)
    torch.testing.assert_close(ctx.layer.keys, keys.gather(2, index))  # keys untouched
    torch.testing.assert_close(ctx.layer.values, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ctx.layer.values, values.gather(2, index))


def test_probability_zero_is_snapkv():
    ctx, q = random_layer(n=60, seed=12)
    twin, _ = random_layer(n=60, seed=12)
    NeverMerge(budget=20, window=6, kernel=3).compress(q, ctx)
    SnapKV(budget=20, window=6, kernel=3).compress(q, twin)
    assert torch.equal(ctx.layer.positions, twin.layer.positions)
    assert torch.equal(ctx.layer.keys, twin.layer.keys)
    assert torch.equal(ctx.layer.values, twin.layer.values)


def test_draws_are_seeded():
    layers = []
    for seed in (1, 1, 2):
        ctx, q = random_layer(n=60, seed=13)
        CaM(budget=20, window=6, merge=4, seed=seed).compress(q, ctx)
        layers.append(ctx.layer.values)
    assert torch.equal(layers[0], layers[1]) and not torch.equal(layers[0], layers[2])


def test_physical_size_in_the_engine():
    engine = tiny_engine()
    ids = prompt_ids(160)
    cache = prefilled(engine, "cam(budget=40, window=8, merge=8)", ids)
    base = prefilled(engine, "snapkv(budget=40, window=8)", ids)
    assert torch.equal(cache.layers[0].positions, base.layers[0].positions)
    assert torch.equal(cache.layers[0].keys, base.layers[0].keys)  # layer 0 sees the same input
    assert not torch.equal(cache.layers[0].values, base.layers[0].values)
    for layer in cache.layers:
        assert layer.positions.shape == (1, 2, 40)  # per KV head
    stats = engine.generate_ids(ids, "cam(budget=40, window=8)", max_new_tokens=1).stats
    # keys + values of 40 entries per head and an int32 position per head and entry
    assert stats.kv_tokens == 40 and stats.kv_bytes == 2 * 40 * (ENTRY_BYTES + 2 * 4)


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    for recipe in ("cam(budget=1.0)", "cam(budget=100)"):
        roomy = engine.generate_ids(ids, recipe, max_new_tokens=8)
        assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes


def test_listed_with_paper_and_defaults():
    info = {m.name: m for m in kvlab.methods()}["cam"]
    assert info.stage == "compress" and "ICML 2024" in info.paper and info.summary
    params = {p.name: p for p in info.params}
    assert {k: params[k].default for k in params} == {
        "budget": 2048, "window": 32, "kernel": 5, "pooling": "avg", "gqa_reduce": "mean",
        "merge": 32, "seed": 0,
    }
    assert all(p.help for p in info.params)
    assert isinstance(Recipe(compress=parse_recipe("cam").compress).compress, CaM)
    with pytest.raises(kvlab.RecipeError, match="odd"):
        parse_recipe("cam(kernel=4)")
    with pytest.raises(kvlab.RecipeError, match=">= 1"):
        parse_recipe("cam(merge=0)")


def test_engine_evicts_as_snapkv_and_merges_evicted_values_into_the_next_kept_entries():
    """Through the engine, against the eager model: kept positions and keys are SnapKV's; each
    kept value gains ``v_j / merge`` for every evicted ``j`` among the ``merge`` evicted
    entries before it that drew ``u_j < p_j`` (written out with loops)."""
    from tests.compress.reference import eager_run, head_positions
    from tests.compress.test_snapkv import assert_top_plus_window, engine_votes

    n, budget, window, merge, seed = 100, 40, 8, 8, 3
    ids = prompt_ids(n, seed=2)
    peaky = dict(initializer_range=0.2)  # attention that differs clearly between entries
    run = eager_run(ids, **peaky)
    engine = tiny_engine(**peaky)
    cache = prefilled(engine, f"cam(budget={budget}, window={window}, merge={merge}, seed={seed})", ids)
    merged_any = False
    for index, layer in enumerate(cache.layers):
        heads = head_positions(layer)
        assert_top_plus_window(heads, engine_votes(run, index, window, 5), budget, window, n)
        probs = run.probs[index][:, n - window :]  # [Hq, w, n]
        seen = (torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]).sum(0)
        attention = run.grouped(probs.sum(1) / seen.clamp(min=1))  # [Hkv, n]
        draws = torch.rand(1, 2, n, generator=torch.Generator().manual_seed(seed * 2 + index))[0]
        for h, kept in enumerate(heads):
            torch.testing.assert_close(layer.keys[0, h], run.keys[index][h, kept], atol=1e-5, rtol=1e-5)
            expected = run.values[index][h, kept].clone()
            for j in sorted(set(range(n)) - set(kept)):
                receivers = [slot for slot, pos in enumerate(kept) if pos > j][:merge]
                if not receivers:
                    continue
                reference = attention[h, [kept[r] for r in receivers]].mean()
                p = min(1.0, float(attention[h, j] / reference))
                if draws[h, j] < p:
                    merged_any = True
                    for r in receivers:
                        expected[r] += run.values[index][h, j] / merge
            torch.testing.assert_close(layer.values[0, h], expected, atol=1e-5, rtol=1e-5)
    assert merged_any
