"""SALE: 4-bit per-block q.k estimate, tiles whose Relative Attention Score reaches the threshold."""

import pytest
import torch

from kvlab.errors import RecipeError
from kvlab.prefill.blocks import rotated
from kvlab.prefill.sale import Sale
from kvlab.recipe import parse_recipe
from tests.prefill.reference import (
    assert_engine_dense_when_covering, context_for, masked_dense, rotated_inputs, tiles_to_tokens,
)

LISTED = "sale(threshold=0.99, block=8)"


def int4(x, block):
    """Symmetric 4-bit rounding per block of rows (one head ``[m, d]``), written out."""
    out = torch.empty_like(x)
    for b in range(0, x.shape[0], block):
        rows = x[b : b + block]
        scale = float(rows.abs().max()) / 7
        out[b : b + block] = torch.round(rows / scale).clamp(-7, 7) * scale
    return out


def reference_tiles(ctx, q, threshold, block):
    qr, k, _ = rotated_inputs(ctx, q)
    heads, n = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    nb = -(-n // block)
    tiles = torch.zeros(heads, nb, nb, dtype=torch.bool)
    for h in range(heads):
        keys = k[0, h // group]
        qq, kq = int4(qr[0, h], block), int4(keys - keys.mean(0), block)
        for i in range(n):
            logits = torch.tensor([float(qq[i] @ kq[j]) * ctx.scaling for j in range(i + 1)])
            relative = torch.exp(logits - logits.max())
            for j in range(i + 1):
                if relative[j] >= threshold:
                    tiles[h, i // block, j // block] = True
            tiles[h, i // block, i // block] = True  # the diagonal tile
    return tiles


@pytest.mark.parametrize("threshold, block, n", [(0.3, 8, 70), (0.05, 16, 100), (0.9, 7, 50)])
def test_equals_brute_force_low_bit_relative_score_tiles(threshold, block, n):
    ctx, q = context_for(n, heads=2, seed=7)
    got = Sale(threshold=threshold, block=block).attend(q, ctx)
    expected = masked_dense(ctx, q, tiles_to_tokens(reference_tiles(ctx, q, threshold, block), n, block))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_equals_dense_at_threshold_zero():
    assert_engine_dense_when_covering("sale(threshold=0.0, block=16)", LISTED)


def test_the_estimate_is_not_full_precision():
    """Low-bit: the 4-bit estimate picks other tiles than the exact logits would on some input."""
    from kvlab.prefill import sale as module

    ctx, q = context_for(256, heads=2, seed=8)
    qr, k, _ = rotated(q, ctx)
    method = Sale(threshold=0.8, block=16)
    low = method.block_mask(qr, k, torch.arange(256), ctx.scaling)
    exact = module.quantize_blocks
    try:
        module.quantize_blocks = lambda x, block: x.float()
        full = method.block_mask(qr, k, torch.arange(256), ctx.scaling)
    finally:
        module.quantize_blocks = exact
    assert not torch.equal(low, full)


def test_bad_parameters_refused():
    for recipe in ["sale(threshold=1.5)", "sale(threshold=-0.1)", "sale(block=0)"]:
        with pytest.raises(RecipeError):
            parse_recipe(recipe)
