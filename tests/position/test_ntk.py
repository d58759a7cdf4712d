"""Static NTK-aware scaling: base * s^(d/(d-2)); the highest frequency kept, the lowest / s."""

import pytest
import torch

from kvlab.position.ntk import StaticNTK
from tests.conftest import tiny_engine
from tests.position.identity import assert_differs_from_full, assert_equals_full

LISTED = "ntk(factor=4)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0])
def test_frequencies_follow_the_ntk_aware_base(factor):
    engine = tiny_engine(rope_theta=10000.0)  # head dim 16
    d = 16
    base = 10000.0 * factor ** (d / (d - 2))
    expected = torch.tensor([base ** (-2 * i / d) for i in range(d // 2)])
    rotary = StaticNTK(factor=factor).rotary(engine.config, seq_len=1)
    torch.testing.assert_close(rotary.inv_freq, expected, rtol=1e-5, atol=0)
    # the NTK-aware property: the fastest pair is kept and the slowest is divided by ~ s
    assert rotary.inv_freq[0] == pytest.approx(1.0)
    trained = 10000.0 ** (-2 * 7 / d)
    assert float(rotary.inv_freq[-1]) == pytest.approx(trained / factor, rel=1e-4)


def test_factor_one_is_full_and_factor_four_is_not():
    assert_equals_full("ntk(factor=1)")
    assert_differs_from_full("ntk(factor=4)")
