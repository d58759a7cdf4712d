"""Llama-3.1 scaling against its three-band formula, written out here."""

import math

import pytest
import torch

import kvlab
from kvlab.position.llama3 import Llama3
from tests.conftest import tiny_engine
from tests.position.identity import assert_differs_from_full, assert_equals_full

LISTED = "llama3(factor=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def llama3_formula(base, d, factor, low, high, trained):
    out = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        wavelength = 2 * math.pi / theta
        if wavelength < trained / high:
            out.append(theta)
        elif wavelength > trained / low:
            out.append(theta / factor)
        else:
            sigma = (trained / wavelength - low) / (high - low)
            out.append((1 - sigma) * theta / factor + sigma * theta)
    return torch.tensor(out)


@pytest.mark.parametrize("factor, low, high", [(8.0, 1.0, 4.0), (2.0, 0.5, 8.0), (1.0, 1.0, 4.0)])
def test_frequencies_follow_the_three_bands(factor, low, high):
    engine = tiny_engine(rope_theta=10000.0)  # head dim 16, trained 256: all three bands occur
    method = Llama3(factor=factor, low_freq_factor=low, high_freq_factor=high)
    rotary = method.rotary(engine.config, seq_len=1)
    expected = llama3_formula(10000.0, 16, factor, low, high, 256)
    torch.testing.assert_close(rotary.inv_freq, expected, rtol=1e-5, atol=0)
    assert rotary.attention_factor == 1.0


def test_factor_one_is_full_and_factor_eight_is_not():
    assert_equals_full("llama3(factor=1)")
    assert_differs_from_full("llama3(factor=8)")


def test_bad_bands_are_refused():
    with pytest.raises(kvlab.RecipeError, match="low_freq_factor < high_freq_factor"):
        kvlab.parse_recipe("llama3(low_freq_factor=4, high_freq_factor=1)")
