"""LongRoPE: per-pair factors from the recipe or the model's config, short up to L0, long past it."""

import math

import pytest
import torch

import kvlab
from kvlab.position.longrope import LongRope
from tests.conftest import prompt_ids, tiny_engine
from tests.position.identity import assert_differs_from_full, assert_equals_full

LONG = [1.0, 1.0, 1.5, 2.0, 3.0, 4.0, 4.0, 4.0]
SHORT = [1.0, 1.0, 1.0, 1.0, 1.2, 1.5, 2.0, 2.0]
LISTED = f"longrope(short_factor={SHORT}, long_factor={LONG})"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def formula(factors, base=10000.0, d=16):
    return torch.tensor([1.0 / (f * base ** (2 * i / d)) for i, f in enumerate(factors)])


def test_short_factors_inside_the_window_long_ones_past_it():
    engine = tiny_engine(rope_theta=10000.0)  # head dim 16, trained 256
    method = kvlab.parse_recipe(LISTED + "").position
    assert isinstance(method, LongRope) and method.long_factor == tuple(LONG)
    short = method.rotary(engine.config, seq_len=200)
    long = method.rotary(engine.config, seq_len=300)
    torch.testing.assert_close(short.inv_freq, formula(SHORT), rtol=1e-6, atol=0)
    torch.testing.assert_close(long.inv_freq, formula(LONG), rtol=1e-6, atol=0)
    attention = math.sqrt(1 + math.log(4.0) / math.log(256))
    assert short.attention_factor == pytest.approx(attention) == long.attention_factor
    assert method.frequency_key(200, 256) != method.frequency_key(300, 256)


def test_factors_are_read_from_the_models_config():
    engine = tiny_engine(rope_theta=10000.0)
    engine.config.rope_parameters = {
        **engine.config.rope_parameters, "long_factor": LONG, "short_factor": SHORT,
    }
    rotary = LongRope(factor=2.0).rotary(engine.config, seq_len=300)
    torch.testing.assert_close(rotary.inv_freq, formula(LONG), rtol=1e-6, atol=0)


def test_ones_with_factor_one_are_full_and_searched_factors_are_not():
    ones = [1.0] * 8
    assert_equals_full(f"longrope(factor=1, short_factor={ones}, long_factor={ones})")
    assert_differs_from_full(LISTED)


def test_rerotated_keys_agree_with_one_prefill_past_the_window():
    """Crossing L0 switches to the long factors for every key (kept pre-RoPE): a chunked prefill
    that crosses it equals one prefill of the whole sequence."""
    ids = prompt_ids(300)
    engine = tiny_engine()
    engine.prefill_chunk = 1000
    whole = engine.prefill(engine.new_sequence(LISTED), ids, compress=True)
    engine.prefill_chunk = 100
    chunked = engine.prefill(engine.new_sequence(LISTED), ids, compress=True)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe, fragment", [
    ("longrope(long_factor=[1, 2])", "needs 8"),
    ("longrope", "no LongRoPE factors"),
])
def test_missing_or_wrong_factors_are_refused(recipe, fragment):
    engine = tiny_engine()
    with pytest.raises(kvlab.RecipeError, match=fragment):
        engine.new_sequence(recipe).rotary(engine.config, 10, 256)


def test_bad_factor_values_are_refused_when_parsed():
    with pytest.raises(kvlab.RecipeError, match="list of positive numbers"):
        kvlab.parse_recipe("longrope(long_factor=[1, -2])")
