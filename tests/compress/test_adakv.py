"""AdaKV: SnapKV/PyramidKV scores, the layer's budget split unevenly over KV heads, stored ragged."""

import pytest
import torch

import kvlab
from kvlab.compress.adakv import AdaKV
from kvlab.compress.pyramidkv import pyramid_budgets
from kvlab.engine.ragged import RaggedLayerKV
from kvlab.errors import RecipeError
from tests.compress.test_snapkv import reference_scores
from tests.conftest import prefilled, prompt_ids, tiny_engine
from tests.layers import layer_context, rotary as random_rotary


LISTED = "adakv(budget=30, window=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def reference_keep(scores, choose, window, n, alpha):
    """AdaKV's allocation written out: global top-k hits, safeguarded, largest remainders."""
    flat = sorted(((float(s), h, j) for h, row in enumerate(scores) for j, s in enumerate(row)), reverse=True)
    hits = [0] * len(scores)
    for _, h, _ in flat[: len(scores) * choose]:
        hits[h] += 1
    wanted = [alpha * choose + (1 - alpha) * c for c in hits]
    caps = [int(w // 1) for w in wanted]
    for h in sorted(range(len(caps)), key=lambda h: (-(wanted[h] - caps[h]), h))[: len(scores) * choose - sum(caps)]:
        caps[h] += 1
    keep = []
    for row, cap in zip(scores, caps):
        top = row.topk(cap).indices.tolist()
        keep.append(sorted(top + list(range(n - window, n))))
    return keep


def random_ragged(n=60, d=8, kv_heads=3, query_heads=6, seed=0, peaked=True):
    torch.manual_seed(seed)
    keys = torch.randn(1, kv_heads, n, d)
    if peaked:  # head 0: a few keys aligned with every query draw the attention
        keys[0, 0, [5, 17, 33]] *= 6
    layer = RaggedLayerKV()
    layer.append(keys, torch.randn(1, kv_heads, n, d), torch.arange(n))
    rotary = random_rotary(d)
    q = torch.randn(1, query_heads, n, d)
    q[0, :2] = keys[0, 0, [5]].abs().mean() + q[0, :2]
    return layer, rotary, q


@pytest.mark.parametrize("alpha", [0.2, 0.0, 1.0])
def test_keep_matches_the_reference(alpha):
    layer, rotary, q = random_ragged()
    ctx = layer_context(layer, torch.arange(layer.num_entries), rotary)
    keys_before, n = layer.keys.clone(), layer.num_entries
    scores = reference_scores(q, keys_before, rotary, window=6, kernel=3)
    expected = reference_keep(scores, choose=14, window=6, n=n, alpha=alpha)
    AdaKV(budget=20, window=6, kernel=3, alpha=alpha).compress(q, ctx)
    assert [head.key_positions().tolist() for head in layer.heads] == expected
    for h, head in enumerate(layer.heads):
        torch.testing.assert_close(head.keys[0, 0], keys_before[0, h, expected[h]])
    assert sum(layer.head_entries()) == 3 * 20  # SnapKV's total, split differently
    if alpha == 1.0:
        assert layer.head_entries() == [20, 20, 20]
    if alpha == 0.2:
        assert len(set(layer.head_entries())) > 1  # the point of the method


def test_pyramid_scorer_uses_the_layer_budgets():
    sizes = []
    for index in range(4):
        layer, rotary, q = random_ragged()
        ctx = layer_context(layer, torch.arange(layer.num_entries), rotary, index, 4)
        AdaKV(budget=20, window=6, kernel=3, scorer="pyramidkv").compress(q, ctx)
        sizes.append(sum(layer.head_entries()))
    assert sizes == [3 * b for b in pyramid_budgets(20, 6, 60, 4, 20.0)]


def test_physical_bytes_equal_snapkv_at_the_same_budget():
    engine = tiny_engine(num_key_value_heads=2)
    ids = prompt_ids(160)
    sizes = {}
    for recipe in ("full", "snapkv(budget=40, window=8)", "adakv(budget=40, window=8)"):
        cache = prefilled(engine, recipe, ids)
        sizes[recipe] = cache.nbytes()
        if recipe.startswith("adakv"):
            layer = cache.layers[0]
            assert isinstance(layer, RaggedLayerKV) and layer.is_ragged
            per_head = [h.keys.shape[2] for h in layer.heads]
            assert sum(per_head) == 2 * 40
            d = layer.heads[0].keys.shape[-1]
            assert layer.nbytes() == sum(per_head) * (2 * d * 4 + 4)  # fp32 k, v + int32 position
    assert sizes["adakv(budget=40, window=8)"] == sizes["snapkv(budget=40, window=8)"]
    assert sizes["adakv(budget=40, window=8)"] < 0.3 * sizes["full"]


def test_budget_covering_the_context_equals_full():
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, max_new_tokens=12)
    ada = engine.generate_ids(ids, max_new_tokens=12, recipe="adakv(budget=1.0)")
    assert ada.token_ids == full.token_ids


def test_generation_and_sessions_on_ragged_heads(tokenizer):
    engine = tiny_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048)
    context = "The code of the red door is 4417. " * 30
    session = engine.session(context, recipe="adakv(budget=0.3, window=8)", mode="multi-request")
    entries = [layer.head_entries() for layer in session.sequence.layers]
    first = session.ask("What is the code?", max_new_tokens=6)
    assert [layer.head_entries() for layer in session.sequence.layers] == entries
    assert session.ask("What is the code?", max_new_tokens=6).token_ids == first.token_ids
    assert first.stats.kv_bytes < 0.5 * engine.session(context).context_stats.kv_bytes


def test_bad_parameters_and_combinations():
    with pytest.raises(RecipeError, match="scorer"):
        kvlab.parse_recipe("adakv(scorer=h2o)")
    with pytest.raises(RecipeError, match="alpha"):
        kvlab.parse_recipe("adakv(alpha=1.5)")
    with pytest.raises(RecipeError, match="kivi"):
        kvlab.parse_recipe("adakv(budget=0.5) + kivi(bits=4)")
    with pytest.raises(RecipeError, match="quest"):
        kvlab.parse_recipe("adakv(budget=0.5) + quest(budget=64)")


def test_engine_heads_keep_their_adaptive_share_of_the_eager_votes_plus_the_window():
    from tests.compress.reference import assert_top_k, eager_run, head_positions
    from tests.compress.test_snapkv import engine_votes

    n, budget, window, alpha = 120, 40, 8, 0.2
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids)
    engine = tiny_engine()
    cache = prefilled(engine, f"adakv(budget={budget}, window={window}, alpha={alpha})", ids)
    uneven = False
    for index, layer in enumerate(cache.layers):
        votes = engine_votes(run, index, window, 5)
        expected = reference_keep(votes, budget - window, window, n, alpha)
        heads = head_positions(layer)
        assert [len(h) for h in heads] == [len(h) for h in expected] == layer.head_entries()
        for kept, head_votes in zip(heads, votes):
            assert kept[-window:] == list(range(n - window, n))
            assert_top_k(kept[:-window], head_votes, len(kept) - window)
        uneven |= len(set(layer.head_entries())) > 1
    assert uneven  # the test is meaningful: heads really got different shares
