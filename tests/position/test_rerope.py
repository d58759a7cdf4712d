"""ReRoPE and Leaky ReRoPE against their relative-position matrices, with log-n scaling."""

import math

import pytest
import torch

from kvlab.engine.rotary import Rotary
from kvlab.position.rerope import ReRope
from tests.position.identity import assert_equals_full
from tests.position.reference import engine_against_reference, pairwise_attention

LISTED = "rerope(window=16)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def rerope_relative(window, leaky=False, k=16.0):
    """``min(i - j, w)``; leaky: ``w + (i - j - w) / k`` past the window."""
    def relative(i, j):
        if i - j < window:
            return i - j
        return window + (i - j - window) / k if leaky else window

    return relative


def log_n(trained):
    return lambda i: max(1.0, math.log(i + 1) / math.log(trained))


@pytest.mark.parametrize("window, leaky, k", [(5, False, 16.0), (4, True, 3.0), (7, True, 16.0)])
def test_merge_is_exact_against_pairwise_brute_force(window, leaky, k):
    torch.manual_seed(0)
    n, t, d = 36, 6, 8
    q, k_, v = torch.randn(1, 4, t, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    rotary = Rotary(1.0 / 100 ** (torch.arange(0, d, 2).float() / d), trained_length=16)  # log scale > 1
    q_pos = list(range(n - t, n))
    method = ReRope(window=window, leaky=leaky, k=k)
    got = method.attend(q, torch.tensor(q_pos), k_, torch.arange(n), v, rotary, d**-0.5)
    expected = pairwise_attention(
        q, k_, v, q_pos, torch.arange(n), rerope_relative(window, leaky, k), rotary, d**-0.5, log_n(16)
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recipe, relative", [
    ("rerope(window=10)", rerope_relative(10)),
    ("rerope(window=6, leaky=true, k=4)", rerope_relative(6, True, 4.0)),
])
def test_engine_chunked_prefill_and_decoding_equal_the_written_out_matrix(recipe, relative):
    # trained length 40 < 64 tokens: the log-n query scaling acts on the last rows
    got, expected, dense = engine_against_reference(
        recipe, relative, query_scale=log_n(40), max_position_embeddings=40
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)


def test_identity_settings_are_full_attention():
    assert_equals_full("rerope(window=200)")  # every distance inside the window
    assert_equals_full("rerope(window=4, leaky=true, k=1)")  # slope 1: plain RoPE


def test_windows():
    assert ReRope(window=512, leaky=True, k=16).context_window(4096) == (4096 - 512) * 16 + 512
    assert ReRope().context_window(4096) >= 4096 * 16
