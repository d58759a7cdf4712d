"""LaMPE: head window plus a length-aware sigmoid mapping, against the written-out matrix."""

import math

import pytest
import torch

from kvlab.engine.rotary import Rotary
from kvlab.position.lampe import LaMPE
from tests.position.identity import assert_equals_full
from tests.position.reference import engine_against_reference, pairwise_attention

SMALL = dict(head=8, scale=20.0, slope=0.05, offset=-2.0)
LISTED = "lampe(head=16, scale=60.0, slope=0.01, offset=-1.0)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def lampe_relative(head, scale, slope, offset, length_of):
    """The paper's positions for a query at ``i`` in a sequence of ``L = length_of(i)``:
    ``i - j`` inside the head window (or when ``L < 2 head``), else
    ``m(i) + b1 - m(j)`` with ``m(p) = floor(M p / (L - 1))``, ``M = A / (1 + e^-(aL + b))``,
    ``b1 = head - (m(head) + 1)``."""
    def relative(i, j):
        length = length_of(i)
        if i - j < head or length < 2 * head:
            return i - j
        mapping = scale / (1 + math.exp(-(slope * length + offset)))
        m = lambda p: math.floor(mapping * p / (length - 1))  # noqa: E731
        return m(i) + head - (m(head) + 1) - m(j)

    return relative


def test_mapping_length_is_the_scaled_sigmoid():
    method = LaMPE()  # the paper's Llama-3 fit
    for length in (8192, 16384, 65536):
        assert method.mapping_length(length) == pytest.approx(6204.4 / (1 + math.exp(-(1.0493e-4 * length - 2.4666))))
    assert method.mapping_length(16384) > method.mapping_length(8192)  # grows with the length


def test_merge_is_exact_against_pairwise_brute_force():
    torch.manual_seed(0)
    n, t, d = 40, 6, 8
    q, k, v = torch.randn(1, 4, t, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    rotary = Rotary(1.0 / 100 ** (torch.arange(0, d, 2).float() / d), 1.1, trained_length=64)
    q_pos = list(range(n - t, n))
    got = LaMPE(**SMALL).attend(q, torch.tensor(q_pos), k, torch.arange(n), v, rotary, d**-0.5)
    relative = lampe_relative(**SMALL, length_of=lambda i: n)  # one forward: L = n for every row
    expected = pairwise_attention(q, k, v, q_pos, torch.arange(n), relative, rotary, d**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_engine_chunked_prefill_and_decoding_equal_the_written_out_matrix():
    """Prefill chunks [0, 32) and [32, 60) map with L = 32 and 60; each decoding step with
    its own new length."""
    prompt = 60
    length_of = lambda i: 32 if i < 32 else (prompt if i < prompt else i + 1)  # noqa: E731
    recipe = "lampe(head=8, scale=20.0, slope=0.05, offset=-2.0, attention_factor=1.2)"
    got, expected, dense = engine_against_reference(
        recipe, lampe_relative(**SMALL, length_of=length_of), attention_factor=1.2, prompt=prompt
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)


def test_shorter_than_two_heads_is_full_attention():
    assert_equals_full("lampe(head=64, attention_factor=1.0)")  # 106 tokens < 2 x 64


def test_one_forward_maps_with_one_length_however_its_queries_are_split():
    """A prefill method (A-shape) attends a forward's queries block by block: the mapping uses
    the forward's length (the rotary's), so blocks equal one call over every query."""
    torch.manual_seed(3)
    n, d = 48, 8
    q, k, v = torch.randn(1, 4, 30, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    rotary = Rotary(1.0 / 100 ** (torch.arange(0, d, 2).float() / d), trained_length=64, seq_len=n)
    method, q_pos = LaMPE(head=8, scale=40.0, slope=0.1, offset=-4.0), torch.arange(n - 30, n)
    whole = method.attend(q, q_pos, k, torch.arange(n), v, rotary, d**-0.5)
    blocks = torch.cat([
        method.attend(q[:, :, a : a + 7], q_pos[a : a + 7], k, torch.arange(n), v, rotary, d**-0.5)
        for a in range(0, 30, 7)
    ], dim=2)
    torch.testing.assert_close(blocks, whole, atol=1e-6, rtol=1e-6)
    unknown = Rotary(rotary.inv_freq, trained_length=64)  # no seq_len: L = the block's last + 1
    early = method.attend(q[:, :, :7], q_pos[:7], k, torch.arange(n), v, unknown, d**-0.5)
    assert not torch.allclose(early, whole[:, :, :7], atol=1e-4)  # L = 25: another mapping
