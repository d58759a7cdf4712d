"""DPE: per-dimension-group Self-Extend against its per-pair relative positions."""

import math

import pytest
import torch

import kvlab
from kvlab.engine.rotary import Rotary
from kvlab.position.dpe import DPE
from tests.compress.reference import reference_logits
from tests.conftest import prompt_ids, tiny_engine
from tests.position.identity import assert_equals_full

LISTED = "dpe(scales=[1, 2, 4, 8], window=16)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def dpe_relative(scales, window, pairs):
    """Per pair p (group g = p // (pairs / G)): ``i - j`` inside the window, else
    ``floor(i / s_g) + W - floor(W / s_g) - floor(j / s_g)``."""
    per = pairs // len(scales)

    def relative(i, j):
        if i - j < window:
            return [float(i - j)] * pairs
        return [float(i // s + window - window // s - j // s) for s in scales for _ in range(per)]

    return relative


def pairwise(q, k, v, q_pos, k_pos, relative, inv_freq, scaling):
    """Attention pair by pair: q_i rotated, pair by pair, by its per-pair relative positions."""
    _, hq, t, d = q.shape
    hk = k.shape[1]
    out = torch.zeros(1, hq, t, d)
    for h in range(hq):
        kh = h // (hq // hk)
        for r, i in enumerate(q_pos):
            logits = []
            for j in k_pos:
                if j > i:
                    logits.append(-math.inf)
                    continue
                angles = torch.tensor(relative(i, j), dtype=torch.float64) * inv_freq.double()
                cos, sin = torch.cat([angles.cos()] * 2).float(), torch.cat([angles.sin()] * 2).float()
                x = q[0, h, r]
                qr = x * cos + torch.cat([-x[d // 2 :], x[: d // 2]]) * sin
                logits.append(float((qr * k[0, kh, j]).sum()) * scaling)
            probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).float()
            out[0, h, r] = (probs[:, None] * v[0, kh]).sum(0)
    return out


@pytest.mark.parametrize("scales, window", [((1, 2, 3, 8), 4), ((4, 4), 6), ((2, 1, 1, 5), 3)])
def test_merge_is_exact_against_pairwise_brute_force(scales, window):
    torch.manual_seed(0)
    n, t, d = 30, 5, 16
    q, k, v = torch.randn(1, 4, t, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    inv_freq = 1.0 / 100 ** (torch.arange(0, d, 2).float() / d)
    q_pos = list(range(n - t, n))
    got = DPE(scales=scales, window=window).attend(
        q, torch.tensor(q_pos), k, torch.arange(n), v, Rotary(inv_freq), d**-0.5
    )
    expected = pairwise(q, k, v, q_pos, list(range(n)), dpe_relative(scales, window, d // 2), inv_freq, d**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def dpe_attention(scales, window):
    """DPE written out for ``reference_logits``: per-pair positions, one softmax per query."""
    def attention(layer, q, k, v, rope):
        inv_freq = rope.model.model.rotary_emb.inv_freq
        hq, n, d = q.shape
        g = hq // k.shape[0]
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        relative = dpe_relative(scales, window, d // 2)
        out = torch.zeros_like(q)
        for i in range(n):
            angles = torch.tensor([relative(i, j) for j in range(i + 1)], dtype=torch.float64) * inv_freq.double()
            cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
            qi = q[:, i : i + 1]
            qr = qi * cos + torch.cat([-qi[..., d // 2 :], qi[..., : d // 2]], -1) * sin
            probs = torch.softmax((qr * k[:, : i + 1]).sum(-1) / d**0.5, dim=-1)
            out[:, i] = (probs[..., None] * v[:, : i + 1]).sum(1)
        return out

    return attention


def test_engine_chunked_prefill_and_decoding_equal_the_written_out_positions():
    prompt, steps = 60, 4
    ids = prompt_ids(prompt + steps, seed=2)
    expected = torch.log_softmax(reference_logits(ids, dpe_attention((1, 2, 4, 8), 8)), -1)[prompt - 1 :]
    engine = tiny_engine()
    engine.prefill_chunk = 32
    cache = engine.new_sequence("dpe(scales=[1, 2, 4, 8], window=8)")
    got = engine.teacher_force(cache, engine.prefill(cache, ids[:prompt], compress=True), ids[prompt:] + [0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    dense = torch.log_softmax(reference_logits(ids), -1)[prompt - 1 :]
    assert not torch.allclose(got, dense, atol=1e-3)


def test_scale_one_everywhere_is_full_attention():
    assert_equals_full("dpe(scales=[1, 1, 1, 1], window=8)")
    assert DPE(scales=(2, 8), window=1024).context_window(8192) == (8192 - 1024) * 8 + 1024


@pytest.mark.parametrize("recipe, fragment", [
    ("dpe(scales=[0, 2])", "integers >= 1"),
    ("dpe(scales=[])", "non-empty"),
])
def test_bad_scales_are_refused(recipe, fragment):
    with pytest.raises(kvlab.RecipeError, match=fragment):
        kvlab.parse_recipe(recipe)


def test_scales_that_do_not_split_the_pairs_are_refused():
    engine = tiny_engine()  # 8 dimension pairs
    with pytest.raises(kvlab.RecipeError, match="8 RoPE dimension pairs"):
        engine.prefill(engine.new_sequence("dpe(scales=[1, 2, 3], window=4)"), list(range(10)), compress=True)
