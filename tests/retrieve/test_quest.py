"""Quest: page bounds are upper bounds, selection is per head, attention is exact on it."""

import torch

from kvlab.engine.cache import LayerKV
from kvlab.engine.context import Phase
from kvlab.engine.kernels import dense_attention
from tests.layers import layer_context, rotary as random_rotary
from kvlab.retrieve.quest import INDEX_KEY, Quest, page_min_max, page_scores
from tests.conftest import prompt_ids, tiny_engine


def decode_context(n=100, d=8, seed=0):
    torch.manual_seed(seed)
    layer = LayerKV()
    layer.append(torch.randn(1, 2, n, d), torch.randn(1, 2, n, d), torch.arange(n))
    rotary = random_rotary(d)
    return layer_context(layer, torch.tensor([n - 1]), rotary, 5, 8, phase=Phase.DECODE)


def test_page_score_bounds_every_dot_product_in_the_page():
    torch.manual_seed(1)
    keys, q = torch.randn(1, 2, 64, 8), torch.randn(1, 4, 1, 8)
    mins, maxs = page_min_max(keys, 16)
    bound = page_scores(q, mins, maxs)  # [1, 4, 4]
    for h in range(4):
        dots = (q[0, h, 0] @ keys[0, h // 2].T).reshape(4, 16)
        assert torch.all(bound[0, h] >= dots.amax(dim=1) - 1e-5)


def test_selected_pages_contain_the_true_top_key():
    ctx = decode_context()
    q = torch.randn(1, 4, 1, 8)
    qr = ctx.rotary.rotate(q, ctx.positions)
    # plant, for query head 0, a key far more aligned than any other in page 3
    ctx.layer.keys[0, 0, 50] = qr[0, 0, 0] * 10
    method = Quest(budget=48, page=16)
    mins, maxs = method.bounds(ctx.layer)
    pages = method.select_pages(qr, mins, maxs, 3)
    true_top = int((qr[0, 0, 0] @ ctx.layer.keys[0, 0].T).argmax())
    assert true_top == 50 and 50 // 16 in pages[0, 0].tolist()


def test_attention_is_exact_over_the_selected_pages():
    ctx = decode_context()
    q = torch.randn(1, 4, 1, 8)
    method = Quest(budget=48, page=16)
    got = method.attend(q, ctx)
    qr = ctx.rotary.rotate(q, ctx.positions)
    mins, maxs = method.bounds(ctx.layer)
    pages = method.select_pages(qr, mins, maxs, 3)
    for h in range(4):
        index = torch.cat([torch.arange(p * 16, min(p * 16 + 16, 100)) for p in pages[0, h].tolist()])
        k = ctx.layer.keys[:, h // 2 : h // 2 + 1, index]
        v = ctx.layer.values[:, h // 2 : h // 2 + 1, index]
        expected = dense_attention(qr[:, h : h + 1], k, v, ctx.scaling, None)
        torch.testing.assert_close(got[:, h : h + 1], expected, atol=1e-5, rtol=1e-5)
    dense = dense_attention(qr, ctx.layer.keys, ctx.layer.values, ctx.scaling, None)
    assert not torch.allclose(got, dense, atol=1e-4)


def test_bounds_are_stored_incrementally_and_counted():
    ctx = decode_context(n=100)
    method = Quest(budget=48, page=16)
    mins, maxs = method.bounds(ctx.layer)
    assert mins.shape == (1, 2, 7, 8)  # 6 complete pages + the partial last one
    index = ctx.layer.side[INDEX_KEY]
    assert index.pages == 6 and index.nbytes() == 2 * 1 * 2 * 6 * 8 * 4
    ref_min, ref_max = page_min_max(ctx.layer.keys, 16)
    torch.testing.assert_close(mins, ref_min)
    torch.testing.assert_close(maxs, ref_max)


def test_engine_quest_dense_layers_budget_and_bytes():
    engine = tiny_engine()
    ids = prompt_ids(160)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    roomy = engine.generate_ids(ids, "quest(budget=1.0, page=16, dense_layers=0)", max_new_tokens=8)
    assert roomy.token_ids == full.token_ids
    # the first two layers are dense: with a 2-layer model the default never selects
    assert engine.generate_ids(ids, "quest(budget=32)", max_new_tokens=8).token_ids == full.token_ids
    sparse = engine.generate_ids(ids, "quest(budget=32, page=8, dense_layers=0)", max_new_tokens=8)
    assert sparse.token_ids != full.token_ids
    assert sparse.stats.kv_tokens == full.stats.kv_tokens  # the cache is kept whole
    assert sparse.stats.kv_bytes > full.stats.kv_bytes  # plus the page bounds
