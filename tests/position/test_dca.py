"""DCA: intra-, successive- and inter-chunk positions against its relative-position matrix."""

import pytest
import torch

import kvlab
from kvlab.engine.rotary import Rotary
from kvlab.position.dca import DualChunkAttention
from tests.position.identity import assert_equals_full
from tests.position.reference import engine_against_reference, pairwise_attention

LISTED = "dca(chunk_size=48, local_window=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def dca_relative(size, window):
    """The paper's matrix: keys at ``j mod c``; the query at ``i mod c`` in its own chunk,
    ``min(i mod c + c, s)`` for the previous chunk, ``min(2c - 1, s)`` for older ones."""
    c = size - window

    def relative(i, j):
        if i // c == j // c:
            return i - j
        if j // c == i // c - 1:
            return min(i % c + c, size) - j % c
        return min(2 * c - 1, size) - j % c

    return relative


@pytest.mark.parametrize("size, window", [(12, 3), (10, 5), (9, 1)])
def test_merge_is_exact_against_pairwise_brute_force(size, window):
    torch.manual_seed(0)
    n, t, d = 40, 7, 8
    q, k, v = torch.randn(1, 4, t, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    rotary = Rotary(1.0 / 100 ** (torch.arange(0, d, 2).float() / d), trained_length=64)
    q_pos = list(range(n - t, n))
    got = DualChunkAttention(chunk_size=size, local_window=window).attend(
        q, torch.tensor(q_pos), k, torch.arange(n), v, rotary, d**-0.5
    )
    expected = pairwise_attention(q, k, v, q_pos, torch.arange(n), dca_relative(size, window), rotary, d**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_kept_entries_keep_their_positions_per_head():
    """After compression each KV head holds other positions: chunks follow the positions."""
    torch.manual_seed(1)
    n, d = 30, 8
    keep = torch.stack([torch.randperm(60)[:n].sort().values for _ in range(2)])[None]  # [1, 2, n]
    q, k, v = torch.randn(1, 4, 1, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    rotary = Rotary(1.0 / 100 ** (torch.arange(0, d, 2).float() / d), trained_length=64)
    got = DualChunkAttention(chunk_size=12, local_window=3).attend(q, torch.tensor([60]), k, keep, v, rotary, d**-0.5)
    expected = pairwise_attention(q, k, v, [60], keep, dca_relative(12, 3), rotary, d**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size, window", [(24, 4), (20, 10)])
def test_engine_chunked_prefill_and_decoding_equal_the_written_out_matrix(size, window):
    got, expected, dense = engine_against_reference(
        f"dca(chunk_size={size}, local_window={window})", dca_relative(size, window)
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)


def test_inside_one_chunk_it_is_full_attention():
    # default on the tiny model (trained 256): chunk 192, window 16, chunk length 176 > 106 tokens
    assert_equals_full("dca")
    assert DualChunkAttention().sizes(8192) == (6144, 6144 - 512)


@pytest.mark.parametrize("recipe, fragment", [
    ("dca(chunk_size=16, local_window=16)", "local_window < chunk_size"),
    ("dca(chunk_size=300)", "trained length 256"),
])
def test_bad_sizes_are_refused(recipe, fragment):
    from tests.conftest import tiny_engine

    engine = tiny_engine()
    with pytest.raises(kvlab.RecipeError, match=fragment):
        engine.prefill(engine.new_sequence(recipe), [1, 2, 3], compress=True)
