"""STRING: shifted relative positions against the written-out matrix; a large shift is RoPE."""

import math

import pytest
import torch

import kvlab
from kvlab.engine.rotary import Rotary
from kvlab.position.string import String
from tests.position.identity import assert_equals_full
from tests.position.reference import engine_against_reference, pairwise_attention

LISTED = "string(shift=40, local_window=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def string_relative(shift, window):
    """The paper's P(i, j): ``i - j`` below the shift S, ``i - j - S + W`` from it on."""
    return lambda i, j: i - j if i - j < shift else i - j - shift + window


@pytest.mark.parametrize("shift, window", [(10, 3), (7, 7), (12, 0)])
def test_merge_is_exact_against_pairwise_brute_force(shift, window):
    torch.manual_seed(0)
    n, t, d = 36, 6, 8
    q, k, v = torch.randn(1, 4, t, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    rotary = Rotary(1.0 / 100 ** (torch.arange(0, d, 2).float() / d), 1.2, trained_length=64)
    q_pos = list(range(n - t, n))
    got = String(shift=shift, local_window=window).attend(q, torch.tensor(q_pos), k, torch.arange(n), v, rotary, d**-0.5)
    expected = pairwise_attention(q, k, v, q_pos, torch.arange(n), string_relative(shift, window), rotary, d**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_engine_chunked_prefill_and_decoding_equal_the_written_out_matrix():
    factor = 0.1 * math.log(2) + 1  # the default attention factor scales cos and sin
    got, expected, dense = engine_against_reference(
        "string(shift=20, local_window=5)", string_relative(20, 5), attention_factor=factor
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)


def test_shift_past_every_distance_is_full_attention():
    assert_equals_full("string(shift=200, attention_factor=1.0)")  # 106 tokens: no distance shifts


def test_defaults_and_window():
    method = String()
    assert method.resolved_shift(8192) == int(0.33 * 8192)
    assert method.context_window(8192) == 8192 + int(0.33 * 8192) - 128
    with pytest.raises(kvlab.RecipeError, match="local_window <= shift"):
        String(shift=10, local_window=20).resolved_shift(256)
