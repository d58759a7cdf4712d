"""Tri-shape: A-shape (sinks + window) with the last rows of the forward dense."""

import pytest
import torch

from kvlab.errors import RecipeError
from kvlab.prefill.tri_shape import TriShape
from kvlab.recipe import parse_recipe
from tests.prefill.reference import assert_engine_dense_when_covering, context_for, masked_dense

LISTED = "tri_shape(sink=4, window=16, last=10)"


@pytest.mark.parametrize("sink, window, last, block", [(3, 10, 9, 16), (0, 1, 1, 7), (5, 20, 0, 32), (2, 5, 80, 8)])
def test_equals_brute_force_a_shape_plus_dense_last_rows(sink, window, last, block):
    n = 70
    ctx, q = context_for(n, seed=5)
    got = TriShape(sink=sink, window=window, last=last, block=block).attend(q, ctx)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((i - j < window) | (j < sink) | (i >= n - last))
    torch.testing.assert_close(got, masked_dense(ctx, q, allowed), atol=1e-5, rtol=1e-5)


def test_equals_dense_when_the_window_covers_the_input():
    assert_engine_dense_when_covering("tri_shape(sink=4, window=120, last=10)", LISTED)


def test_differs_from_ashape_only_in_the_last_rows():
    ctx, q = context_for(70, seed=6)
    tri = TriShape(sink=3, window=10, last=12, block=16)
    got, ashape = tri.attend(q, ctx), tri.ashape.attend(q, ctx)
    torch.testing.assert_close(got[:, :, :58], ashape[:, :, :58])
    assert not torch.allclose(got[:, :, 58:], ashape[:, :, 58:], atol=1e-3)


def test_bad_parameters_refused():
    for recipe in ["tri_shape(window=0)", "tri_shape(last=-1)", "tri_shape(sink=-2)"]:
        with pytest.raises(RecipeError):
            parse_recipe(recipe)
