"""``Stats.attended_pairs_per_layer``: the query-key pairs each layer's prefill computed,
counted where attention is computed (dense, a sparse pattern's tiles), not from a formula."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, prompt_ids, tiny_engine

HEADS = TINY["num_attention_heads"]


def causal(n: int) -> int:
    return n * (n + 1) // 2


@pytest.mark.parametrize("chunk", [1024, 32, 50])
def test_dense_prefill_counts_every_causal_pair_once(chunk: int) -> None:
    engine = tiny_engine()
    engine.prefill_chunk = chunk
    stats = engine.generate_ids(prompt_ids(150), "full", max_new_tokens=2).stats
    assert stats.attended_pairs_per_layer == [HEADS * causal(150)] * TINY["num_hidden_layers"]


def test_ashape_counts_its_band_and_block_sparse_fewer_than_dense() -> None:
    engine = tiny_engine()
    n, sink, window = 150, 4, 16
    stats = engine.generate_ids(prompt_ids(n), f"ashape(sink={sink}, window={window}, block=32)",
                                max_new_tokens=1).stats
    band = sum(min(i + 1, window + min(max(i + 1 - window, 0), sink)) for i in range(n))
    assert stats.attended_pairs_per_layer == [HEADS * band] * TINY["num_hidden_layers"]
    n = 250
    sparse = engine.generate_ids(prompt_ids(n), "block_sparse(topk=1, block=8)", max_new_tokens=1).stats
    for pairs in sparse.attended_pairs_per_layer:  # each row: its top tile, diagonal tile(s), the first
        assert HEADS * n < pairs <= HEADS * n * 4 * 8 < HEADS * causal(n) // 2


def test_block_kernel_counts_exactly_the_pairs_its_mask_allows() -> None:
    """The kernel's count (a per-key formula over consecutive rows) equals the written-out
    mask's pair count, columns and a padded last query block included."""
    import torch

    from kvlab.prefill.blocks import block_sparse_attention, causal_blocks

    g = torch.Generator().manual_seed(4)
    t, n, block, heads = 70, 70, 16, 4
    q, k, v = (torch.randn(1, h, n, 8, generator=g) for h in (heads, 2, 2))
    pos = torch.arange(n)
    blocks = (torch.rand(1, heads, 5, 5, generator=g) > 0.5) | torch.eye(5, dtype=torch.bool)
    blocks &= causal_blocks(pos, n, block)
    columns = torch.stack([torch.randperm(n, generator=g)[:6] for _ in range(heads)])[None]
    counted = []
    block_sparse_attention(q, k, v, pos, blocks, 0.3, block, count=counted.append, columns=columns)
    i, j = pos[:, None], pos[None, :]
    want = 0
    for h in range(heads):
        tiles = blocks[0, h].repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]
        cols = torch.zeros(n, dtype=torch.bool)
        cols[columns[0, h]] = True
        want += int(((tiles | cols[None, :]) & (j <= i)).sum())
    assert int(sum(counted)) == want
