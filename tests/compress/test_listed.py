"""Every compress method is listed by `kvlab methods` with its stage, paper and parameters."""

import pytest

import kvlab
from kvlab.recipe import parse_recipe

DEFAULTS = {
    "knorm": {"budget": 2048, "window": 0, "skip_layers": 2},
    "keydiff": {"budget": 2048, "window": 0},
    "tova": {"budget": 2048},
    "h2o": {"budget": 0.2, "recent": 0.5},
    "pyramidkv": {"budget": 2048, "window": 32, "kernel": 5, "pooling": "avg", "beta": 20.0},
    "expected_attention": {
        "budget": 2048, "future": 512, "sink": 4, "covariance": True, "value_norm": True,
        "epsilon": 0.0,
    },
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_listed_with_paper_and_documented_defaults(name):
    info = {m.name: m for m in kvlab.methods()}[name]
    assert info.stage == "compress" and "arXiv:" in info.paper and info.summary
    params = {p.name: p for p in info.params}
    assert {k: params[k].default for k in DEFAULTS[name]} == DEFAULTS[name]
    assert all(p.help for p in info.params)
    assert parse_recipe(name).compress.name == name  # every default is a valid recipe


@pytest.mark.parametrize("text, fragment", [
    ("h2o(recent=1.5)", "<= 1.0"), ("pyramidkv(beta=0.5)", ">= 1.0"),
    ("pyramidkv(kernel=4)", "pyramidkv(kernel=4)"), ("knorm(window=-1)", ">= 0"),
    ("expected_attention(future=0)", ">= 1"),
])
def test_bad_parameters_are_refused(text, fragment):
    with pytest.raises(kvlab.RecipeError) as info:
        parse_recipe(text)
    assert fragment in str(info.value)
