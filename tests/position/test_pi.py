"""Position Interpolation: every frequency divided by the factor; factor 1 is RoPE as trained."""

import torch

from kvlab.position.pi import PositionInterpolation
from tests.conftest import tiny_engine
from tests.position.identity import assert_differs_from_full, assert_equals_full

LISTED = "pi(factor=2)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def test_frequencies_are_the_trained_ones_divided_by_the_factor():
    engine = tiny_engine(rope_theta=10000.0)  # head dim 16
    for factor in (1.0, 2.0, 8.0):
        rotary = PositionInterpolation(factor=factor).rotary(engine.config, seq_len=1)
        expected = [10000.0 ** (-2 * i / 16) / factor for i in range(8)]
        torch.testing.assert_close(rotary.inv_freq, torch.tensor(expected), rtol=1e-6, atol=0)
        assert rotary.attention_factor == 1.0
    assert PositionInterpolation(factor=4).context_window(8192) == 32768


def test_factor_one_is_full_and_factor_two_is_not():
    assert_equals_full("pi(factor=1)")
    assert_differs_from_full("pi(factor=2)")
