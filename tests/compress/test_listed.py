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
    assert_recipe_refused(text, fragment)


# -- every registered method, every stage ---------------------------------------------------
import importlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from kvlab.cli import app  # noqa: E402
from kvlab.registry import method_class  # noqa: E402
from tests.conftest import assert_recipe_refused, prompt_ids, tiny_engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N = 120
REGISTERED = [m for m in kvlab.methods() if m.name != "full"]


def listed_setting(info) -> str:
    """The method's ``LISTED`` recipe, from its own test module (so a new method stays one
    file + one test): a setting where it must change something on a 120-token prompt of a
    2-layer tiny model (defaults that would not act there are overridden)."""
    module = importlib.import_module(f"tests.{info.stage}.test_{info.name}")
    recipe = getattr(module, "LISTED", None)
    assert isinstance(recipe, str), f"tests/{info.stage}/test_{info.name}.py: define LISTED = '<recipe>'"
    assert parse_recipe(recipe).methods[0].name == info.name
    return recipe


@pytest.mark.parametrize("info", REGISTERED, ids=lambda m: m.name)
def test_listed_in_the_readme_the_cli_and_tested_in_its_own_module(info):
    assert f"`{info.name}`" in (ROOT / "README.md").read_text()
    listed = json.loads(CliRunner().invoke(app, ["methods", "--json"]).stdout)
    assert {m["name"]: m["stage"] for m in listed}[info.name] == info.stage
    assert info.summary and info.paper and all(p.help for p in info.params)
    module = ROOT / "tests" / info.stage / f"test_{info.name}.py"
    assert module.is_file() and info.name in module.read_text()


def follow_up(engine, recipe, ids, steps=4):
    """The cache after the prompt and the log-probabilities of ``steps`` teacher-forced steps."""
    cache = engine.new_sequence(recipe)
    logits = engine.prefill(cache, ids, compress=True)
    return cache, engine.teacher_force(cache, logits, prompt_ids(steps, seed=9))


@pytest.mark.parametrize("info", [m for m in REGISTERED if m.stage != "reuse"], ids=lambda m: m.name)
def test_every_method_changes_what_it_says_it_changes(info):
    """A stub that keeps the full cache or does nothing fails here: compress methods keep
    fewer entries, quantize methods hold fewer bytes, and every method's outputs differ
    from ``full`` (retrieve: at a small budget; position and prefill: past the window, or
    past the trained length for dynamic_ntk). Reuse methods act only on documents encoded
    apart and joined (not on one prompt): their own tests compare them with ``full``."""
    engine = tiny_engine()
    n = 300 if info.name == "dynamic_ntk" else N  # the trained length is 256
    ids = prompt_ids(n, seed=8)
    full, dense = follow_up(engine, "full", ids)
    cache, got = follow_up(engine, listed_setting(info), ids)
    entries = [sum(layer.head_entries()) for layer in cache.layers]
    whole = [sum(layer.head_entries()) for layer in full.layers]
    if info.stage == "compress" or getattr(method_class(info.name), "selects_tokens", False):
        assert all(e < w for e, w in zip(entries, whole)), entries
        assert cache.nbytes() < full.nbytes()
    else:
        assert entries == whole  # only compress and token-selective prefill methods hold fewer
    if info.stage == "quantize":
        assert cache.nbytes() < full.nbytes()
    assert not torch.allclose(got, dense, atol=1e-4)
