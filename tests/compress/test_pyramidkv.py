"""PyramidKV: SnapKV's choice within a layer, budgets decreasing with depth, mean = budget."""

import pytest

from tests.layers import random_layer, rotary
from tests.compress.test_snapkv import reference_keep as snapkv_reference
from tests.conftest import prefilled, prompt_ids, tiny_engine
from kvlab.compress.pyramidkv import PyramidKV, pyramid_budgets


LISTED = "pyramidkv(budget=30, window=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def test_layer_budgets_follow_the_paper():
    # B=40, w=8, n=120, L=4, beta=20: C=32, min=1.6, max=62.4, step=20.27
    assert pyramid_budgets(40, 8, 120, 4, 20) == [62 + 8, 42 + 8, 22 + 8, 2 + 8]
    # max >= n - w: max = n - w = 52, min = 2C - max = 12
    assert pyramid_budgets(40, 8, 60, 2, 20) == [52 + 8, 12 + 8]
    assert pyramid_budgets(40, 8, 120, 1, 20) == [40]


@pytest.mark.parametrize("budget, window, context, layers, beta", [
    (2048, 32, 30000, 32, 20), (2048, 32, 3000, 32, 20), (256, 8, 1000, 30, 5),
    (100, 0, 101, 24, 20), (64, 32, 5000, 28, 20),
])
def test_lower_layers_keep_more_and_the_mean_is_the_budget(budget, window, context, layers, beta):
    budgets = pyramid_budgets(budget, window, context, layers, beta)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) / layers - budget) <= 0.5
    assert window <= budgets[-1] and budgets[0] <= context


def test_each_layer_chooses_as_snapkv_with_its_budget():
    for index, layer_budget in ((0, 70), (3, 10)):
        ctx, q = random_layer(n=120, seed=10, index=index, num_layers=4)
        expected = snapkv_reference(q, ctx.layer.keys, rotary(8), layer_budget, 8, 3, "max", "mean")
        PyramidKV(budget=40, window=8, kernel=3, pooling="max").compress(q, ctx)
        assert ctx.layer.positions[0].tolist() == expected


def test_physical_size_in_the_engine():
    engine = tiny_engine()
    ids = prompt_ids(160)
    cache = prefilled(engine, "pyramidkv(budget=40, window=8)", ids)
    # C=32, min=1.6, max=62.4 (< 152), L=2: layer 0 keeps 62 + 8, layer 1 keeps 2 + 8
    assert [layer.positions.shape for layer in cache.layers] == [(1, 2, 70), (1, 2, 10)]
    for layer in cache.layers:
        for head in layer.positions[0].tolist():
            assert head[-8:] == list(range(152, 160))
    whole = engine.generate_ids(ids, "full", max_new_tokens=1).stats.kv_bytes
    small = engine.generate_ids(ids, "pyramidkv(budget=40, window=8)", max_new_tokens=1).stats
    assert small.kv_tokens == 40  # the mean over layers is the budget
    per_layer = whole // 2
    assert small.kv_bytes == per_layer * 70 // 160 + per_layer * 10 // 160 + 2 * (70 + 10) * 4


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    roomy = engine.generate_ids(ids, "pyramidkv(budget=100)", max_new_tokens=8)
    assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes
    squeezed = engine.generate_ids(ids, "pyramidkv(budget=30, window=4)", max_new_tokens=1)
    assert squeezed.stats.kv_tokens == 30


def test_engine_layers_keep_snapkv_choices_with_the_pyramid_budgets_of_their_depth():
    """Four layers (budget 40, window 8, n = 120, beta 20): C = 32, min = 1.6, max = 62.4,
    step = 20.27, so the layers keep 62, 42, 22, 2 voted entries plus the window, each chosen
    by SnapKV's votes (the eager model's attention)."""
    from tests.compress.reference import eager_run, head_positions
    from tests.compress.test_snapkv import assert_top_plus_window, engine_votes

    ids = prompt_ids(120, seed=2)
    run = eager_run(ids, num_hidden_layers=4)
    engine = tiny_engine(num_hidden_layers=4)
    cache = prefilled(engine, "pyramidkv(budget=40, window=8, kernel=5)", ids)
    for index, (layer, budget) in enumerate(zip(cache.layers, [70, 50, 30, 10])):
        votes = engine_votes(run, index, 8, 5)
        assert_top_plus_window(head_positions(layer), votes, budget, 8, 120)
