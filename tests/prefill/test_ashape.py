"""A-shape: sinks plus a local window, computed without a full score matrix."""

import pytest
import torch

from kvlab.engine.cache import LayerKV
from kvlab.engine.context import Phase
from kvlab.engine.kernels import dense_attention
from tests.layers import layer_context, rotary as random_rotary
from kvlab.prefill.ashape import AShape
from tests.compress.reference import causal_softmax_attention, reference_logits
from tests.conftest import prompt_ids, tiny_engine


LISTED = "ashape(sink=4, window=16)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def context_for(n, heads=2, d=8, seed=0):
    torch.manual_seed(seed)
    layer = LayerKV()
    layer.append(torch.randn(1, heads, n, d), torch.randn(1, heads, n, d), torch.arange(n))
    rotary = random_rotary(d)
    ctx = layer_context(layer, torch.arange(n), rotary, phase=Phase.APPEND)
    return ctx, torch.randn(1, 2 * heads, n, d)


def test_equals_brute_force_sink_plus_window_mask():
    ctx, q = context_for(70)
    method = AShape(sink=3, window=10, block=16)
    got = method.attend(q, ctx)
    i, j = torch.arange(70)[:, None], torch.arange(70)[None, :]
    allowed = (j <= i) & ((i - j < 10) | (j < 3))
    expected = dense_attention(ctx.rotary.rotate(q, torch.arange(70)), ctx.layer.keys, ctx.layer.values, ctx.scaling, allowed)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_equals_dense_when_the_window_covers_the_input():
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    wide = engine.generate_ids(ids, "ashape(sink=4, window=120, block=32)", max_new_tokens=8)
    assert wide.token_ids == full.token_ids
    narrow = engine.prefill(engine.new_sequence("ashape(sink=4, window=16, block=32)"), ids, compress=False)
    dense = engine.prefill(engine.new_sequence("full"), ids, compress=False)
    assert not torch.allclose(narrow, dense, atol=1e-3)


def test_each_block_reads_only_sinks_and_window():
    method = AShape(sink=128, window=1024, block=256)
    n = 32_000
    widest = max(method.key_indices(s, min(s + 255, n - 1)).numel() for s in range(0, n, 256))
    assert widest <= 128 + 1024 + 255  # independent of n: no n x n score matrix
    keys = method.key_indices(5000, 5255)
    assert keys[:128].tolist() == list(range(128)) and keys[128] == 5000 - 1023


def test_the_full_cache_is_still_stored():
    engine = tiny_engine()
    stats = engine.generate_ids(prompt_ids(120), "ashape(sink=4, window=16)", max_new_tokens=2).stats
    assert stats.kv_tokens == 121


@pytest.mark.parametrize("sink, window, block, chunk", [(3, 10, 16, 48), (0, 1, 7, 1024), (5, 20, 256, 40)])
def test_engine_prefill_equals_the_written_out_sink_and_window_mask(sink, window, block, chunk):
    """Every prompt query ``i`` attends to keys ``j < sink`` and ``i - window < j <= i``, in
    every layer, whatever the blocks and prefill chunks; decoding is dense again."""
    prompt, steps = 100, 3
    ids = prompt_ids(prompt + steps, seed=2)

    def attention(layer, q, k, v, rope):
        n = q.shape[1]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j < sink) | (i - j < window) | (i >= prompt)  # the decoding rows: dense
        return causal_softmax_attention(rope(q, torch.arange(n)), rope(k, torch.arange(n)), v, allowed)

    expected = torch.log_softmax(reference_logits(ids, attention), -1)[prompt - 1 :]
    engine = tiny_engine()
    engine.prefill_chunk = chunk
    cache = engine.new_sequence(f"ashape(sink={sink}, window={window}, block={block})")
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    got = engine.teacher_force(cache, logits, ids[prompt:] + [0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].num_entries == prompt + steps  # the full cache is stored
