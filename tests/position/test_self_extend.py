"""Self-Extend: group size 1 is full attention; the merged attention equals brute force."""

import math

import pytest
import torch

from tests.layers import rotary as random_rotary
from kvlab.position.self_extend import SelfExtend
from tests.compress.reference import Rope, reference_logits
from tests.conftest import prompt_ids, tiny_engine, tiny_model


LISTED = "self_extend(group_size=4, window=16)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def brute_force(q, k, v, group, window, rotary, scaling):
    """Per (query, key) pair: normal positions inside the window, grouped ones beyond it;
    one softmax per query over every causal key (the exact LSE merge of the two passes)."""
    b, hq, t, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, t, d)
    for h in range(hq):
        kh = h // (hq // hk)
        for i in range(t):
            qi = n - t + i  # queries are the last t positions
            logits = []
            for j in range(n):
                if j > qi:
                    logits.append(-math.inf)
                    continue
                if qi - j < window:
                    qp, kp = qi, j
                else:
                    qp, kp = qi // group + window - window // group, j // group
                qr = rotary.rotate(q[:, h : h + 1, i : i + 1], torch.tensor([qp]))
                kr = rotary.rotate(k[:, kh : kh + 1, j : j + 1], torch.tensor([kp]))
                logits.append(float((qr * kr).sum()) * scaling)
            probs = torch.softmax(torch.tensor(logits), dim=0)
            out[0, h, i] = (probs[:, None] * v[0, kh]).sum(0)
    return out


@pytest.mark.parametrize("group, window", [(2, 4), (3, 5), (4, 8)])
def test_merge_is_exact_against_brute_force(group, window):
    torch.manual_seed(0)
    n, t, d = 24, 6, 8
    q, k, v = torch.randn(1, 4, t, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    rotary = random_rotary(d)
    method = SelfExtend(group_size=group, window=window)
    got = method.attend(q, torch.arange(n - t, n), k, torch.arange(n), v, rotary, d**-0.5)
    expected = brute_force(q, k, v, group, window, rotary, d**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_group_size_one_equals_full_attention():
    engine = tiny_engine()
    ids = prompt_ids(150)
    full = engine.generate_ids(ids, "full", max_new_tokens=10)
    extended = engine.generate_ids(ids, "self_extend(group_size=1, window=16)", max_new_tokens=10)
    assert extended.token_ids == full.token_ids
    a = engine.prefill(engine.new_sequence("full"), ids, compress=False)
    b = engine.prefill(engine.new_sequence("self_extend(group_size=1, window=16)"), ids, compress=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_grouping_changes_only_far_attention():
    engine = tiny_engine()
    ids = prompt_ids(150)
    full = engine.prefill(engine.new_sequence("full"), ids, compress=False)
    wide = engine.prefill(engine.new_sequence("self_extend(group_size=4, window=200)"), ids, compress=False)
    grouped = engine.prefill(engine.new_sequence("self_extend(group_size=4, window=16)"), ids, compress=False)
    torch.testing.assert_close(wide, full, atol=1e-4, rtol=1e-4)  # every key is a neighbour
    assert not torch.allclose(grouped, full, atol=1e-3)


def test_keys_are_cached_before_rope_and_window_formula():
    engine = tiny_engine()
    cache = engine.new_sequence("self_extend(group_size=2, window=8)")
    ids = prompt_ids(20)
    engine.prefill(cache, ids, compress=False)
    plain = engine.new_sequence("full")
    engine.prefill(plain, ids, compress=False)
    rope = Rope(tiny_model())  # the model's own RoPE, outside kvlab
    torch.testing.assert_close(
        rope(cache.layers[0].keys[0], torch.arange(20)), plain.layers[0].keys[0], atol=1e-5, rtol=1e-5
    )
    assert SelfExtend(group_size=8, window=1024).context_window(8192) == (8192 - 1024) * 8 + 1024
    assert SelfExtend(group_size=4, window=512).grouped_query_positions(torch.tensor([1000])).item() == 1000 // 4 + 512 - 128


def self_extend_attention(group, window):
    """Self-Extend written out entry by entry: a key within ``window`` of the query uses the
    normal positions; a farther one the grouped positions, key ``j // G`` and query
    ``i // G + W - W // G``; one softmax over both."""

    def attention(layer, q, k, v, rope):
        n = q.shape[1]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        g = q.shape[0] // k.shape[0]
        near = rope(q, torch.arange(n)) @ rope(k, torch.arange(n)).repeat_interleave(g, 0).transpose(1, 2)
        far = rope(q, torch.arange(n) // group + window - window // group) @ (
            rope(k, torch.arange(n) // group).repeat_interleave(g, 0).transpose(1, 2)
        )
        logits = torch.where(i - j < window, near, far) / q.shape[-1] ** 0.5
        probs = torch.softmax(logits.masked_fill(j > i, float("-inf")), dim=-1)
        return probs @ v.repeat_interleave(g, 0)

    return attention


@pytest.mark.parametrize("group, window", [(4, 8), (3, 5), (2, 1)])
def test_engine_prefill_and_decoding_equal_the_written_out_definition(group, window):
    prompt, steps = 60, 4
    ids = prompt_ids(prompt + steps, seed=2)
    expected = torch.log_softmax(reference_logits(ids, self_extend_attention(group, window)), -1)
    engine = tiny_engine()
    engine.prefill_chunk = 32  # two prefill chunks
    cache = engine.new_sequence(f"self_extend(group_size={group}, window={window})")
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    got = engine.teacher_force(cache, logits, ids[prompt:] + [0])
    # tight: moving the one key at distance W between the two regions changes ~1e-4
    torch.testing.assert_close(got, expected[prompt - 1 :], atol=1e-5, rtol=1e-5)
    dense = torch.log_softmax(reference_logits(ids), -1)[prompt - 1 :]
    assert not torch.allclose(got, dense, atol=1e-3)
