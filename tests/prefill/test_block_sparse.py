"""Block-sparse: top key blocks per query block by mean-pooled rotated q.k, plus diagonal and first."""

import pytest
import torch

from kvlab.errors import RecipeError
from kvlab.prefill.block_sparse import BlockSparse
from kvlab.prefill.blocks import widest_gathered
from kvlab.recipe import parse_recipe
from tests.prefill.reference import (
    assert_engine_dense_when_covering, context_for, masked_dense, rotated_inputs, tiles_to_tokens,
)

LISTED = "block_sparse(topk=1, block=16)"


def reference_tiles(ctx, q, topk, block):
    qr, k, _ = rotated_inputs(ctx, q)
    heads, n = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    nb = -(-n // block)
    tiles = torch.zeros(heads, nb, nb, dtype=torch.bool)
    for h in range(heads):
        qp = [qr[0, h, b * block : (b + 1) * block].mean(0) for b in range(nb)]
        kp = [k[0, h // group, b * block : (b + 1) * block].mean(0) for b in range(nb)]
        for qb in range(nb):
            causal = list(range(qb + 1))  # aligned blocks: key blocks up to the diagonal
            ranked = sorted(causal, key=lambda kb: -float(qp[qb] @ kp[kb]))
            for kb in ranked[:topk] + [qb, 0]:
                tiles[h, qb, kb] = True
    return tiles


@pytest.mark.parametrize("topk, block, n", [(1, 8, 70), (3, 16, 100), (2, 7, 50)])
def test_equals_brute_force_top_blocks(topk, block, n):
    ctx, q = context_for(n, heads=2, seed=4)
    got = BlockSparse(topk=topk, block=block).attend(q, ctx)
    expected = masked_dense(ctx, q, tiles_to_tokens(reference_tiles(ctx, q, topk, block), n, block))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_equals_dense_when_topk_covers_every_block():
    assert_engine_dense_when_covering("block_sparse(topk=8, block=16)", LISTED)


def test_widest_gathered_set_is_topk_plus_two_blocks():
    n = 32_000
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    tiles = BlockSparse(topk=100, block=64).block_mask(q, k, torch.arange(n))
    assert widest_gathered(tiles, 64) <= (100 + 2) * 64 < n


def test_bad_parameters_refused():
    for recipe in ["block_sparse(topk=0)", "block_sparse(block=0)", "block_sparse(topk=1.5)"]:
        with pytest.raises(RecipeError):
            parse_recipe(recipe)
