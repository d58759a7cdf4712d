"""YaRN frequencies against the paper's formulas (computed independently here)."""

import math

import pytest
import torch

import kvlab
from kvlab.position.yarn import Yarn
from tests.conftest import prompt_ids, tiny_engine


LISTED = "yarn(factor=4)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def paper_yarn(base, dim, factor, trained, beta_fast=32, beta_slow=1):
    """YaRN, section 3: correction dims from rotation counts, linear ramp, interpolation."""
    def correction_dim(rotations):
        return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    inv_freq = []
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
        inv_freq.append((1 - ramp) * theta + ramp * theta / factor)
    return torch.tensor(inv_freq), 0.1 * math.log(factor) + 1.0


def test_yarn_frequencies_match_the_paper():
    engine = tiny_engine(max_position_embeddings=4096, rope_theta=10000.0)
    for factor in (2.0, 4.0, 16.0):
        rotary = Yarn(factor=factor).rotary(engine.config, seq_len=1)
        expected, attention_factor = paper_yarn(10000.0, 16, factor, 4096)
        torch.testing.assert_close(rotary.inv_freq, expected, rtol=1e-5, atol=1e-8)
        assert rotary.attention_factor == pytest.approx(attention_factor, rel=1e-6)


def test_yarn_fast_dims_keep_slow_dims_interpolate():
    engine = tiny_engine(max_position_embeddings=4096)
    base = kvlab.position.TRAINED_ROPE.rotary(engine.config, 1).inv_freq
    yarn = Yarn(factor=8.0).rotary(engine.config, 1).inv_freq
    assert torch.allclose(yarn[0], base[0])  # highest frequency: extrapolated (kept)
    assert torch.allclose(yarn[-1], base[-1] / 8)  # lowest frequency: interpolated


def test_yarn_window_and_effect_on_outputs():
    assert Yarn(factor=4).context_window(8192) == 32768
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.prefill(engine.new_sequence("full"), ids, compress=False)
    yarn = engine.prefill(engine.new_sequence("yarn(factor=4)"), ids, compress=False)
    assert not torch.allclose(full, yarn, atol=1e-4)
