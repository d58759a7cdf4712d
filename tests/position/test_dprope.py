"""DPRoPE: each pair's choice is the least KL between rotary-angle histograms (computed)."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from kvlab.position.base import TRAINED_ROPE
from kvlab.position.dprope import DPRope
from tests.conftest import tiny_engine
from tests.position.identity import assert_differs_from_full, assert_equals_full

LISTED = "dprope(factor=4)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def histogram(theta, positions, bins=360):
    angles = np.mod(np.arange(positions, dtype=np.float64) * theta, 2 * np.pi)
    counts, _ = np.histogram(angles, bins=bins, range=(0.0, 2 * np.pi))
    return counts / counts.sum()


def kl(p, q, floor=1e-8):
    q = np.maximum(q, floor)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def written_out_choice(thetas, trained, factor):
    """The paper's rule with numpy's histogram: interpolate pair i iff its KL is lower."""
    choice = []
    for theta in thetas:
        reference = histogram(theta, trained)
        extrapolated = kl(reference, histogram(theta, int(trained * factor)))
        interpolated = kl(reference, histogram(theta / factor, int(trained * factor)))
        choice.append(interpolated < extrapolated)
    return choice


@pytest.mark.parametrize("trained, d, factor", [(256, 16, 4.0), (2048, 64, 2.0), (4096, 128, 8.0)])
def test_choices_are_the_least_kl_candidates(trained, d, factor):
    config = LlamaConfig(
        hidden_size=d * 2, num_attention_heads=2, max_position_embeddings=trained, rope_theta=10000.0
    )
    method = DPRope(factor=factor)
    chosen = method.choices(config).tolist()
    thetas = TRAINED_ROPE.rotary(config, 1).inv_freq  # the model's own fp32 frequencies
    assert chosen == written_out_choice(thetas.double().tolist(), trained, factor)
    # the distributional argument: a pair that never completes a turn in training sees new
    # angles when extrapolated, so it is interpolated; the choices are not all one way
    assert chosen[-1] and not all(chosen)
    base = thetas
    torch.testing.assert_close(base, torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)]))
    expected = torch.where(torch.tensor(chosen), base / factor, base)
    torch.testing.assert_close(method.rotary(config, 1).inv_freq, expected, rtol=1e-6, atol=0)


def test_factor_one_is_full_and_factor_four_is_not():
    assert_equals_full("dprope(factor=1)")
    assert_differs_from_full(LISTED)
    assert DPRope(factor=4).context_window(8192) == 32768


def test_tiny_model_choice_mixes_both_candidates():
    choice = DPRope(factor=4).choices(tiny_engine().config)
    assert bool(choice.any()) and not bool(choice.all())
