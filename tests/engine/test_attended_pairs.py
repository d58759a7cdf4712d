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
