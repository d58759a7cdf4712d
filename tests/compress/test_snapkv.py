"""SnapKV keeps the top-voted entries per KV head plus the observation window."""

import pytest
import torch
import torch.nn.functional as F

from kvlab.compress.snapkv import SnapKV
from kvlab.engine.cache import LayerKV
from kvlab.engine.context import Phase
from tests.layers import layer_context, rotary as random_rotary
from tests.conftest import prompt_ids, tiny_engine


def reference_scores(q, keys, rotary, window, kernel, pooling="avg", reduce="mean"):
    """SnapKV's votes per KV head ``[n - window]`` written out with loops over heads (rotated q
    and k, causal window)."""
    n, hq, hk = keys.shape[2], q.shape[1], keys.shape[1]
    qr = rotary.rotate(q[:, :, -window:], torch.arange(n - window, n))
    scores = []
    for kv in range(hk):
        votes = []
        for h in range(kv * hq // hk, (kv + 1) * hq // hk):
            logits = qr[0, h] @ keys[0, kv].T / q.shape[-1] ** 0.5
            causal = torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            v = probs[:, : n - window].sum(0)[None, None]
            pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
            votes.append(pool(v, kernel, 1, kernel // 2)[0, 0])
        stacked = torch.stack(votes)
        scores.append(stacked.mean(0) if reduce == "mean" else stacked.amax(0))
    return scores


def reference_keep(q, keys, rotary, budget, window, kernel, pooling, reduce):
    """SnapKV's kept entries per KV head: the top ``budget - window`` votes plus the window."""
    n = keys.shape[2]
    return [
        sorted(score.topk(budget - window).indices.tolist() + list(range(n - window, n)))
        for score in reference_scores(q, keys, rotary, window, kernel, pooling, reduce)
    ]


@pytest.mark.parametrize("pooling, reduce", [("avg", "mean"), ("max", "max")])
def test_keep_matches_the_reference(pooling, reduce):
    torch.manual_seed(0)
    n, d = 60, 8
    layer = LayerKV()
    layer.append(torch.randn(1, 2, n, d), torch.randn(1, 2, n, d), torch.arange(n))
    rotary = random_rotary(d)
    ctx = layer_context(layer, torch.arange(n), rotary)
    q = torch.randn(1, 4, n, d)
    method = SnapKV(budget=20, window=6, kernel=3, pooling=pooling, gqa_reduce=reduce)
    expected = reference_keep(q, layer.keys, rotary, 20, 6, 3, pooling, reduce)
    keys_before = layer.keys.clone()
    method.compress(q, ctx)
    assert layer.positions[0].tolist() == expected
    for h in range(2):
        torch.testing.assert_close(layer.keys[0, h], keys_before[0, h, expected[h]])


def test_per_head_budgets_and_window_in_the_engine():
    engine = tiny_engine()
    cache = engine.new_sequence("snapkv(budget=40, window=8)")
    engine.prefill(cache, prompt_ids(160), compress=True)
    differ = False
    for layer in cache.layers:
        assert layer.positions.shape == (1, 2, 40)
        for head in layer.positions[0]:
            assert head[-8:].tolist() == list(range(152, 160))  # the window is always kept
            assert head.tolist() == sorted(set(head.tolist()))
        differ |= layer.positions[0, 0].tolist() != layer.positions[0, 1].tolist()
    assert differ  # heads choose for themselves


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    assert engine.generate_ids(ids, "snapkv(budget=1.0)", max_new_tokens=8).token_ids == full.token_ids
    squeezed = engine.prefill(engine.new_sequence("snapkv(budget=20, window=4)"), ids, compress=True)
    dense = engine.prefill(engine.new_sequence("full"), ids, compress=True)
    torch.testing.assert_close(squeezed, dense)  # compression happens after the prompt's logits
    cache = engine.new_sequence("snapkv(budget=20, window=4)")
    engine.prefill(cache, ids, compress=True)
    after = engine.forward(cache, [5], Phase.DECODE)
    ref = engine.new_sequence("full")
    engine.prefill(ref, ids, compress=False)
    assert not torch.allclose(after, engine.forward(ref, [5], Phase.DECODE), atol=1e-4)


def test_query_aware_when_the_question_is_in_the_prompt():
    """The same context keeps different entries when followed by different last tokens."""
    engine = tiny_engine()
    context = prompt_ids(150)
    kept = []
    for question in (prompt_ids(10, seed=5), prompt_ids(10, seed=6)):
        cache = engine.new_sequence("snapkv(budget=30, window=10)")
        engine.prefill(cache, context + question, compress=True)
        kept.append(cache.layers[1].positions[0, :, :20].tolist())
    assert kept[0] != kept[1]
