"""Vertical-slash: columns and diagonals from the last queries' attention; diagonals as tiles, columns as keys."""

import pytest
import torch

from kvlab.errors import RecipeError
from kvlab.prefill.blocks import widest_gathered
from kvlab.prefill.vertical_slash import VerticalSlash
from kvlab.recipe import parse_recipe
from tests.prefill.reference import (
    assert_engine_dense_when_covering, context_for, masked_dense, rotated_inputs, tiles_to_tokens,
)

LISTED = "vertical_slash(vertical_size=4, slash_size=8, forced_columns=2, forced_diagonals=4, last_q=16, block=8)"


def reference_mask(ctx, q, vertical_size, slash_size, forced_columns, forced_diagonals, last_q, block):
    """The paper's pattern written out: per head, column and diagonal sums of the last
    ``last_q`` rows' causal softmax, forced lines, top-k, diagonals as tiles, columns as
    single keys, the last rows dense."""
    qr, k, _ = rotated_inputs(ctx, q)
    heads, n = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    nb = -(-n // block)
    mask = torch.zeros(1, heads, n, n, dtype=torch.bool)
    for h in range(heads):
        rows = range(n - last_q, n)
        probs = {}
        for i in rows:
            logits = torch.tensor([float(qr[0, h, i] @ k[0, h // group, j]) * ctx.scaling for j in range(i + 1)])
            probs[i] = torch.softmax(logits, 0)
        vertical = [sum(float(probs[i][j]) for i in rows if j <= i) for j in range(n)]
        slash = [sum(float(probs[i][i - o]) for i in rows if i - o >= 0) for o in range(n)]
        vertical = [float("inf") if j < forced_columns else s for j, s in enumerate(vertical)]
        slash = [float("inf") if o < forced_diagonals else s for o, s in enumerate(slash)]
        columns = set(sorted(range(n), key=lambda j: -vertical[j])[:vertical_size])
        diagonals = set(sorted(range(n), key=lambda o: -slash[o])[:slash_size])
        tiles = torch.zeros(1, nb, nb, dtype=torch.bool)
        for i in range(n):
            for j in range(i + 1):
                if i - j in diagonals:  # a diagonal keeps its tiles
                    tiles[0, i // block, j // block] = True
        mask[0, h] = tiles_to_tokens(tiles, n, block)[0, 0]
        for j in columns:  # a column keeps itself, for every query at or after it
            mask[0, h, j:, j] = True
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return mask | ((i >= n - last_q) & (j <= i))


@pytest.mark.parametrize("params", [
    dict(vertical_size=5, slash_size=6, forced_columns=2, forced_diagonals=3, last_q=16, block=8),
    dict(vertical_size=30, slash_size=10, forced_columns=30, forced_diagonals=1, last_q=7, block=16),
])
def test_equals_brute_force_vertical_slash_tiles(params):
    ctx, q = context_for(90, heads=2, seed=3)
    got = VerticalSlash(**params).attend(q, ctx)
    expected = masked_dense(ctx, q, reference_mask(ctx, q, **params))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_equals_dense_when_every_line_is_kept():
    assert_engine_dense_when_covering(
        "vertical_slash(vertical_size=120, slash_size=120, block=16)", LISTED
    )


def test_widest_gathered_set_is_bounded_by_the_lines_not_n():
    n = 16_384
    method = VerticalSlash(vertical_size=30, slash_size=100)
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    columns, diagonals = method.estimate(q, k, torch.arange(n), 8**-0.5)
    tiles = method.block_mask(diagonals, torch.arange(n - 64), n)
    assert widest_gathered(tiles, 64) + columns.shape[-1] <= 2 * 100 * 64 + 30 < n


def test_bad_parameters_refused():
    for recipe in ["vertical_slash(vertical_size=10)", "vertical_slash(slash_size=50)",
                   "vertical_slash(last_q=0)", "vertical_slash(block=0)"]:
        with pytest.raises(RecipeError):
            parse_recipe(recipe)
