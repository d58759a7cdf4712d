import pytest

import kvlab
from kvlab.compress.snapkv import SnapKV
from kvlab.position.yarn import Yarn
from kvlab.recipe import Recipe, parse_recipe
from kvlab.registry import resolve_budget
from kvlab.retrieve.quest import Quest


def test_parse_one_method_per_stage():
    recipe = parse_recipe("yarn(factor=4) + snapkv(budget=256) + quest(budget=512, page=16)")
    assert recipe.position == Yarn(factor=4.0)
    assert recipe.compress == SnapKV(budget=256)
    assert recipe.retrieve == Quest(budget=512, page=16)
    assert recipe.prefill is None
    assert parse_recipe(str(recipe)) == recipe


@pytest.mark.parametrize("text", ["", "full", "  full  ", None])
def test_full_is_the_empty_recipe(text):
    assert parse_recipe(text) == Recipe()
    assert str(parse_recipe(text)) == "full"


def test_budgets_accept_tokens_and_fractions():
    assert parse_recipe("snapkv(budget=0.25)").compress.budget == 0.25
    assert parse_recipe("snapkv(budget=300)").compress.budget == 300
    assert resolve_budget(0.25, 1000) == 250
    assert resolve_budget(300, 1000) == 300


def test_bare_words_and_booleans():
    recipe = parse_recipe("snapkv(pooling=max) + dynamic_ntk(rerotate_cache=false)")
    assert recipe.compress.pooling == "max"
    assert recipe.position.rerotate_cache is False


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("nope(budget=3)", ["unknown method 'nope'", "snapkv", "quest", "full"]),
        ("snapkv(budgt=3)", ["no parameter 'budgt'", "budget, window"]),
        ("snapkv(budget=0)", ["snapkv(budget=0)", ">= 1"]),
        ("snapkv(budget=1.5)", ["(0, 1]"]),
        ("snapkv(budget='x')", ["budget"]),
        ("yarn(factor='big')", ["yarn(factor='big')", "number"]),
        ("yarn(factor=0.5)", [">= 1.0"]),
        ("snapkv(window=2.5)", ["integer"]),
        ("snapkv(pooling=median)", ["avg", "max"]),
        ("snapkv(kernel=4)", ["odd"]),
        ("snapkv + streaming_llm", ["two compress methods", "snapkv", "streaming_llm"]),
        ("snapkv(256)", ["by name"]),
        ("full + snapkv", ["baseline"]),
        ("snapkv(budget=)", ["cannot parse"]),
        ("self_extend + quest", ["quest", "self_extend", "RoPE"]),
        ("3 + snapkv", ["not a method"]),
    ],
)
def test_bad_recipes_name_the_bad_part(text, fragments):
    with pytest.raises(kvlab.RecipeError) as info:
        parse_recipe(text)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_methods_lists_every_stage_with_papers_and_defaults():
    infos = {m.name: m for m in kvlab.methods()}
    assert {"full", "yarn", "dynamic_ntk", "self_extend", "ashape", "streaming_llm", "snapkv", "quest"} <= set(infos)
    stages = {m.stage for m in infos.values()}
    assert {"position", "prefill", "compress", "retrieve"} <= stages
    for name, info in infos.items():
        if name != "full":
            assert "arXiv" in info.paper or "20" in info.paper, name
            for p in info.params:
                assert p.help, (name, p.name)
    snap = {p.name: p.default for p in infos["snapkv"].params}
    assert snap["window"] == 32 and snap["kernel"] == 5


def test_a_recipe_string_is_parsed_once_per_call_path(monkeypatch, tmp_path, tokenizer):
    """CLI -> engine -> session, and bench config -> runner -> session: one parse per string."""
    import kvlab.recipe as recipes
    from kvlab.bench.config import BenchConfig
    from kvlab.bench.runner import BenchRunner
    from tests.conftest import tiny_model

    parsed: list[str] = []
    build = recipes._build
    monkeypatch.setattr(recipes, "_build", lambda term, source: parsed.append(source) or build(term, source))
    engine = kvlab.Engine(tiny_model(vocab_size=len(tokenizer), max_position_embeddings=2048), tokenizer, progress=False)
    recipe = kvlab.parse_recipe("snapkv(budget=0.5)")
    engine.session("The code is 4417. " * 10, recipe=recipe).ask("Code?", max_new_tokens=2)
    assert parsed == ["snapkv(budget=0.5)"]
    parsed.clear()
    config = BenchConfig(recipes=["snapkv(budget=0.5)"], tasks=["niah_single"], lengths=[300],
                         max_new_tokens=2, out=str(tmp_path / "out"))
    BenchRunner(config, engine).run()
    assert parsed == ["snapkv(budget=0.5)"]
