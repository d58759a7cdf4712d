"""LaMPE: head window plus a length-aware sigmoid mapping, against the written-out matrix."""

import math

import pytest
import torch

from kvlab.engine.rotary import Rotary
from kvlab.position.lampe import LaMPE
from tests.position.identity import assert_equals_full
from tests.position.reference import engine_against_reference, pairwise_attention

SMALL = dict(head=8, tail=5, scale=20.0, slope=0.05, offset=-2.0, short=0)
LISTED = "lampe(head=16, tail=20, scale=60.0, slope=0.01, offset=-1.0, short=0)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def lampe_relative(head, tail, scale, slope, offset, short, length_of):
    """The paper's positions for a query at ``i`` in a sequence of ``L = length_of(i)``,
    written out from the reference code (``llama_cache1.py``): ``i - j`` inside the head window
    (or when ``L < 2 head``); ``i - b2 - j`` in the tail region (the last ``T'`` queries over
    the first ``T'`` keys: ``j <= i - (L - T')``, ``T'`` the last index of ``tail``'s mapped
    chunk, ``b2 = (L - 1 - T') - m(L - 1 - T') - b1``); else ``m(i) + b1 - m(j)`` with
    ``m(p) = floor(M p / (L - 1))``, ``M = A / (1 + e^-(aL + b))``, ``b1 = head - (m(head) + 1)``.
    ``tail=0``: no tail region."""
    def relative(i, j):
        length = length_of(i)
        if i - j < head or length < 2 * head:
            return i - j
        mapping = 1536 if length < short else scale / (1 + math.exp(-(slope * length + offset)))
        m = lambda p: math.floor(mapping * p / (length - 1))  # noqa: E731
        b1 = head - (m(head) + 1)
        if tail:
            kept = min(tail, length - 1)
            while kept + 1 < length and m(kept) == m(kept + 1):  # find_chunk_last_index
                kept += 1
            if j <= i - (length - kept):
                return i - ((length - 1 - kept) - m(length - 1 - kept) - b1) - j
        return m(i) + b1 - m(j)

    return relative


def test_mapping_length_is_the_scaled_sigmoid():
    method = LaMPE()  # the paper's Llama-3 fit
    for length in (8192, 16384, 65536):
        assert method.mapping_length(length) == pytest.approx(6204.4 / (1 + math.exp(-(1.0493e-4 * length - 2.4666))))
    assert method.mapping_length(16384) > method.mapping_length(8192)  # grows with the length
    assert method.mapping_length(8191) == method.mapping_length(2048) == 1536  # below 8192 tokens


@pytest.mark.parametrize("tail, short", [(5, 0), (0, 0), (5, 100)])
def test_merge_is_exact_against_pairwise_brute_force(tail, short):
    torch.manual_seed(0)
    n, t, d = 40, 6, 8
    q, k, v = torch.randn(1, 4, t, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    rotary = Rotary(1.0 / 100 ** (torch.arange(0, d, 2).float() / d), 1.1, trained_length=64)
    q_pos = list(range(n - t, n))
    settings = {**SMALL, "tail": tail, "short": short}  # short=100: L = 40 maps with M = 1536
    got = LaMPE(**settings).attend(q, torch.tensor(q_pos), k, torch.arange(n), v, rotary, d**-0.5)
    relative = lampe_relative(**settings, length_of=lambda i: n)  # one forward: L = n for every row
    expected = pairwise_attention(q, k, v, q_pos, torch.arange(n), relative, rotary, d**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    other = lampe_relative(**{**settings, "tail": 5 - tail}, length_of=lambda i: n)
    assert not torch.allclose(got, pairwise_attention(q, k, v, q_pos, torch.arange(n), other, rotary, d**-0.5), atol=1e-4)


def test_tail_keys_stretch_to_the_end_of_the_mapped_chunk():
    method = LaMPE(**SMALL)  # L = 40: M = 10, m(p) = floor(10 p / 39): m(5) = m(6) = m(7) = 1, m(8) = 2
    assert method.tail_keys(40) == 7
    assert LaMPE(**{**SMALL, "tail": 500}).tail_keys(40) == 39  # T past the sequence: clamped


@pytest.mark.parametrize("tail, chunk", [(5, 32), (5, 64), (0, 32)])
def test_engine_chunked_prefill_and_decoding_equal_the_written_out_matrix(tail, chunk):
    """Prefill chunks [0, 32) and [32, 60) map with L = 32 and 60 (one chunk: L = 60); each
    decoding step with its own new length."""
    prompt = 60
    first = min(chunk, prompt)
    length_of = lambda i: first if i < first else (prompt if i < prompt else i + 1)  # noqa: E731
    recipe = f"lampe(head=8, tail={tail}, scale=20.0, slope=0.05, offset=-2.0, short=0, attention_factor=1.2)"
    got, expected, dense = engine_against_reference(
        recipe, lampe_relative(**{**SMALL, "tail": tail}, length_of=length_of), attention_factor=1.2,
        prompt=prompt, chunk=chunk,
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
    method, q_pos = LaMPE(head=8, tail=6, scale=40.0, slope=0.1, offset=-4.0, short=0), torch.arange(n - 30, n)
    whole = method.attend(q, q_pos, k, torch.arange(n), v, rotary, d**-0.5)
    blocks = torch.cat([
        method.attend(q[:, :, a : a + 7], q_pos[a : a + 7], k, torch.arange(n), v, rotary, d**-0.5)
        for a in range(0, 30, 7)
    ], dim=2)
    torch.testing.assert_close(blocks, whole, atol=1e-6, rtol=1e-6)
    unknown = Rotary(rotary.inv_freq, trained_length=64)  # no seq_len: L = the block's last + 1
    early = method.attend(q[:, :, :7], q_pos[:7], k, torch.arange(n), v, unknown, d**-0.5)
    assert not torch.allclose(early, whole[:, :, :7], atol=1e-4)  # L = 25: another mapping
