"""SnapKV keeps the top-voted entries per KV head plus the observation window."""

import pytest
import torch
import torch.nn.functional as F

from kvlab.compress.snapkv import SnapKV
from kvlab.engine.cache import LayerKV
from kvlab.engine.context import Phase
from tests.layers import layer_context, rotary as random_rotary
from tests.conftest import prefilled, prompt_ids, tiny_engine


LISTED = "snapkv(budget=30, window=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


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
    cache = prefilled(engine, "snapkv(budget=20, window=4)", ids)
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


# -- through the engine, against transformers' own attention ---------------------------------
from tests.compress.reference import assert_top_k, eager_run, head_positions  # noqa: E402


def engine_votes(run, layer, window, kernel, pooling="avg", reduce="mean"):
    """SnapKV's votes ``[Hkv, n - window]`` from the eager model's attention probabilities:
    the last ``window`` queries' probabilities summed per entry before the window, pooled
    along the entries, reduced over the query heads of each KV head."""
    probs = run.probs[layer]
    n = probs.shape[-1]
    votes = probs[:, n - window :, : n - window].sum(dim=1)  # [Hq, n - w]
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    votes = pool(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    return run.grouped(votes, reduce)


def assert_top_plus_window(heads, scores, budget, window, n):
    """Every KV head holds a top ``budget - window`` of its ``scores`` ``[n - window]`` and
    exactly the last ``window`` entries."""
    assert len(heads) == len(scores)
    for kept, head_scores in zip(heads, scores):
        assert kept[len(kept) - window :] == list(range(n - window, n))
        assert_top_k(kept[: len(kept) - window], head_scores, budget - window)


@pytest.mark.parametrize("pooling, reduce, window", [("avg", "mean", 8), ("max", "max", 5), ("avg", "max", 1)])
def test_engine_keeps_the_top_votes_of_the_eager_attention_plus_the_window(pooling, reduce, window):
    n, budget, kernel = 120, 40, 5
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids)
    engine = tiny_engine()
    cache = engine.new_sequence(
        f"snapkv(budget={budget}, window={window}, kernel={kernel}, pooling={pooling}, gqa_reduce={reduce})"
    )
    engine.prefill(cache, ids, compress=True)
    for index, layer in enumerate(cache.layers):
        heads = head_positions(layer)
        assert_top_plus_window(heads, engine_votes(run, index, window, kernel, pooling, reduce), budget, window, n)
        for h, kept in enumerate(heads):
            torch.testing.assert_close(layer.keys[0, h], run.keys[index][h, kept], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.values[0, h], run.values[index][h, kept], atol=1e-5, rtol=1e-5)


def test_decoding_compression_keeps_the_newest_window_and_the_decode_budget():
    engine = tiny_engine()
    ids = prompt_ids(100, seed=2)
    cache = engine.new_sequence("snapkv(budget=40, window=4, decode_budget=36, decode_interval=5)")
    logits = engine.prefill(cache, ids, compress=True)
    follow = prompt_ids(12, seed=4)
    engine.teacher_force(cache, logits, follow)  # 11 decoding steps: compressions after 5 and 10
    for layer in cache.layers:
        # 40 after the prefill; step 5: 45 -> 36; steps 6..10: 41 -> 36; step 11 adds one
        assert layer.num_entries == 37
        for head in head_positions(layer):
            assert head[-5:] == list(range(106, 111))  # the last window of queries + step 11
            assert len(set(head)) == 37 and head[:-5] != list(range(106 - 32, 106))  # voted
