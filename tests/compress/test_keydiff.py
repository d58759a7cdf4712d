"""KeyDiff keeps, per KV head, the keys least similar to the head's mean key direction."""

import torch

from tests.layers import random_layer
from tests.conftest import prefilled, prompt_ids, tiny_engine
from kvlab.compress.keydiff import KeyDiff
from kvlab.position.dynamic_ntk import DynamicNTK


LISTED = "keydiff(budget=30)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def reference_keep(keys, budget, window):
    """Anchor = mean of the normalised keys; keep the lowest cosine to it, plus the window."""
    n = keys.shape[2]
    kept = []
    for h in range(keys.shape[1]):
        units = [keys[0, h, j] / keys[0, h, j].norm() for j in range(n)]
        anchor = sum(units) / n
        cosine = [float(units[j] @ anchor / anchor.norm()) for j in range(n - window)]
        distinct = sorted(range(n - window), key=lambda j: cosine[j])[: budget - window]
        kept.append(sorted(distinct + list(range(n - window, n))))
    return kept


def test_keep_matches_the_reference():
    for window in (0, 6):
        ctx, q = random_layer(n=60, seed=2)
        keys_before = ctx.layer.keys.clone()
        expected = reference_keep(keys_before, 20, window)
        KeyDiff(budget=20, window=window).compress(q, ctx)
        assert ctx.layer.positions[0].tolist() == expected
        for h in range(2):
            torch.testing.assert_close(ctx.layer.keys[0, h], keys_before[0, h, expected[h]])


def test_distinctive_keys_survive_redundant_ones_go():
    """Keys crowding one direction are evicted; the few pointing elsewhere are kept."""
    ctx, q = random_layer(n=40, seed=3)
    direction = torch.randn(8)
    ctx.layer.keys[:] = direction + 0.05 * torch.randn_like(ctx.layer.keys)
    distinct = [5, 22, 31]
    ctx.layer.keys[:, :, distinct] = torch.randn(1, 2, 3, 8) - 2 * direction
    KeyDiff(budget=6).compress(q, ctx)
    for head in ctx.layer.positions[0].tolist():
        assert set(distinct) <= set(head)


def test_scores_the_keys_attention_sees_when_the_cache_is_pre_rope():
    """With keys stored before RoPE (dynamic_ntk re-rotates them), the choice is the one made
    on the rotated keys."""
    rotated, q = random_layer(n=60, seed=4)
    pre_rope, _ = random_layer(n=60, seed=4, position=DynamicNTK())
    KeyDiff(budget=20).compress(q, rotated)
    KeyDiff(budget=20).compress(q, pre_rope)
    assert pre_rope.layer.positions.tolist() == rotated.layer.positions.tolist()


def test_physical_size_in_the_engine():
    engine = tiny_engine()
    ids = prompt_ids(160)
    whole = engine.generate_ids(ids, "full", max_new_tokens=1).stats.kv_bytes
    small = engine.generate_ids(ids, "keydiff(budget=40)", max_new_tokens=1).stats
    assert small.kv_tokens == 40
    assert small.kv_bytes == whole * 40 // 160 + 2 * (2 * 40) * 4  # + int32 positions per head


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    roomy = engine.generate_ids(ids, "keydiff(budget=100)", max_new_tokens=8)
    assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes


def test_engine_keeps_the_keys_least_similar_to_their_heads_mean_direction():
    from tests.compress.reference import assert_top_k, eager_run, head_positions

    n, budget = 100, 30
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids)
    engine = tiny_engine()
    for window in (0, 5):
        cache = prefilled(engine, f"keydiff(budget={budget}, window={window})", ids)
        for index, layer in enumerate(cache.layers):
            for kept, keys in zip(head_positions(layer), run.keys[index]):
                anchor = (keys / keys.norm(dim=-1, keepdim=True)).mean(dim=0)  # every entry
                cos = keys @ anchor / (keys.norm(dim=-1) * anchor.norm())
                assert kept[len(kept) - window :] == list(range(n - window, n))
                assert_top_k(kept[: len(kept) - window], -cos[: n - window], budget - window)
