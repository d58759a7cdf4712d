"""KNorm keeps, per KV head, the entries whose keys have the smallest L2 norm."""

import torch

from tests.layers import random_layer
from tests.conftest import prefilled, prompt_ids, tiny_engine
from kvlab.compress.knorm import KNorm


LISTED = "knorm(budget=30, skip_layers=0)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def reference_keep(keys, budget, window):
    """Per head: the ``budget - window`` lowest-norm keys before the window, plus the window."""
    n = keys.shape[2]
    kept = []
    for h in range(keys.shape[1]):
        norms = [float(keys[0, h, j].norm()) for j in range(n - window)]
        lowest = sorted(range(n - window), key=lambda j: norms[j])[: budget - window]
        kept.append(sorted(lowest + list(range(n - window, n))))
    return kept


def test_keep_matches_the_reference_and_ignores_the_query():
    for window in (0, 5):
        ctx, q = random_layer(n=60)
        keys_before = ctx.layer.keys.clone()
        expected = reference_keep(keys_before, 20, window)
        KNorm(budget=20, window=window, skip_layers=0).compress(q, ctx)
        assert ctx.layer.positions[0].tolist() == expected
        for h in range(2):
            torch.testing.assert_close(ctx.layer.keys[0, h], keys_before[0, h, expected[h]])
        other, _ = random_layer(n=60)  # same keys, different queries: same choice
        KNorm(budget=20, window=window, skip_layers=0).compress(torch.randn(1, 4, 60, 8), other)
        assert other.layer.positions.tolist() == ctx.layer.positions.tolist()


def test_low_norm_keys_survive_and_the_first_layers_are_skipped():
    ctx, q = random_layer(n=50)
    planted = [3, 17, 41]
    ctx.layer.keys[:, :, planted] *= 1e-3
    KNorm(budget=10, skip_layers=0).compress(q, ctx)
    for head in ctx.layer.positions[0].tolist():
        assert set(planted) <= set(head)
    for index, compressed in ((0, False), (1, False), (2, True)):
        ctx, q = random_layer(n=50, index=index, num_layers=3)
        KNorm(budget=10, skip_layers=2).compress(q, ctx)
        assert ctx.layer.num_entries == (10 if compressed else 50)


def test_physical_size_in_the_engine():
    engine = tiny_engine()
    ids = prompt_ids(160)
    whole = engine.generate_ids(ids, "full", max_new_tokens=1).stats.kv_bytes
    cache = prefilled(engine, "knorm(budget=40, skip_layers=0)", ids)
    assert all(layer.positions.shape == (1, 2, 40) for layer in cache.layers)
    small = engine.generate_ids(ids, "knorm(budget=40, skip_layers=0)", max_new_tokens=1).stats
    # 40/160 of the entries, plus one int32 position per kept entry, KV head and layer
    assert small.kv_bytes == whole * 40 // 160 + 2 * (2 * 40) * 4
    skipped = engine.generate_ids(ids, "knorm(budget=40, skip_layers=1)", max_new_tokens=1).stats
    assert skipped.kv_bytes == whole // 2 + (whole // 2) * 40 // 160 + 2 * 40 * 4
    assert skipped.kv_tokens == (160 + 40) / 2


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    roomy = engine.generate_ids(ids, "knorm(budget=1.0, skip_layers=0)", max_new_tokens=8)
    assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes


def test_engine_keeps_the_lowest_norm_keys_past_the_skipped_layers():
    from tests.compress.reference import assert_top_k, eager_run, head_positions

    n, budget, window = 100, 30, 4
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids, num_hidden_layers=3)
    engine = tiny_engine(num_hidden_layers=3)
    cache = prefilled(engine, f"knorm(budget={budget}, window={window}, skip_layers=1)", ids)
    assert cache.layers[0].num_entries == n  # skipped: every entry stays
    for index in (1, 2):
        heads = head_positions(cache.layers[index])
        for kept, keys in zip(heads, run.keys[index]):
            assert kept[-window:] == list(range(n - window, n))
            assert_top_k(kept[:-window], -keys[: n - window].norm(dim=-1), budget - window)
