"""Bench settings: types checked when a BenchConfig is built, config files, help defaults."""

from pathlib import Path

import pytest

import kvlab
from kvlab.bench.config import (
    MAX_LENGTH, QUICK_LENGTHS, QUICK_RECIPES, BenchConfig, default_help, format_length,
    load_config_file,
)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"recipes": 5}, "recipes=5: must be a list of recipe strings"),
        ({"recipes": "full"}, "recipes='full': a single string, not a list"),
        ({"recipes": ["full", 3]}, "item 3 is not a string"),
        ({"tasks": "niah_single"}, "tasks='niah_single': a single string, not a list"),
        ({"lengths": ["1k"]}, "item '1k' is not an integer"),
        ({"lengths": [True]}, "item True is not an integer"),
        ({"lengths": [1.5]}, "item 1.5 is not an integer"),
        ({"lengths": [MAX_LENGTH + 1]}, f"cap of {MAX_LENGTH} tokens"),
        ({"depths": ["a"]}, "depths=['a']: item 'a' is not a number"),
        ({"data": "x.jsonl:ruler"}, "data='x.jsonl:ruler': a single string"),
        ({"max_new_tokens": "5"}, "max_new_tokens='5': must be an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: must be an integer >= 1"),
        ({"samples": 1.5}, "samples=1.5: must be an integer >= 1"),
        ({"samples": True}, "samples=True"),
        ({"seed": "0"}, "seed='0': must be an integer"),
        ({"mode": None}, "mode=None"),
        ({"out": 3}, "out=3: must be a directory path"),
        ({"allow_overflow": "yes"}, "allow_overflow='yes': must be true or false"),
        ({"allow_overflow": 1}, "allow_overflow=1"),
        ({"reference": 7}, "reference=7: must be a recipe string"),
    ],
)
def test_types_are_checked_when_the_config_is_built(overrides, message):
    with pytest.raises(kvlab.InputError) as caught:
        BenchConfig(**overrides)
    assert message in str(caught.value)


def test_bad_reference_recipe_names_the_setting():
    with pytest.raises(kvlab.RecipeError, match=r"reference: recipe 'warp\(x=1\)': unknown method 'warp'"):
        BenchConfig(reference="warp(x=1)")


def test_values_are_normalised():
    config = BenchConfig(recipes=("full",), depths=[0, 1], lengths=(1024,), out=Path("runs/x"))
    assert config.recipes == ["full"] and config.lengths == [1024] and config.out == "runs/x"
    assert config.depths == [0.0, 1.0] and all(isinstance(d, float) for d in config.depths)
    assert config.reference == "full" and config.allow_overflow is False
    assert config.lengths is not QUICK_LENGTHS
    assert BenchConfig(lengths=[MAX_LENGTH]).lengths == [MAX_LENGTH]  # the cap itself is allowed


def test_the_reference_is_part_of_the_settings_only_when_not_full():
    full = BenchConfig().settings_id("m", "cpu")
    assert BenchConfig(reference="full").settings_id("m", "cpu") == full
    assert BenchConfig(allow_overflow=True).settings_id("m", "cpu") == full
    yarn = BenchConfig(reference="yarn(factor=2)").settings_id("m", "cpu")
    assert yarn != full
    assert BenchConfig(reference="yarn(factor=2.0)").settings_id("m", "cpu") == yarn  # canonical


def _file(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_config_file_keys_and_forms(tmp_path):
    path = _file(tmp_path, "b.yaml", "recipes: 'full; snapkv(budget=0.5)'\nlengths: [1k, 3000]\n"
                 "reference: yarn(factor=2)\nallow_overflow: true\ndepths: [0, 0.5]\n")
    assert load_config_file(path) == {
        "recipes": ["full", "snapkv(budget=0.5)"], "lengths": [1024, 3000],
        "reference": "yarn(factor=2)", "allow_overflow": True, "depths": [0.0, 0.5],
    }
    assert load_config_file(_file(tmp_path, "empty.yaml", "")) == {}
    toml = _file(tmp_path, "b.toml", 'tasks = ["niah_single"]\nreference = "full"\n')
    assert load_config_file(toml) == {"tasks": ["niah_single"], "reference": "full"}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("b.yaml", "recipes: 5\n", "recipes=5: must be a list"),
        ("b.yaml", 'depths: ["a"]\n', "item 'a' is not a number"),
        ("b.yaml", 'max_new_tokens: "5"\n', "max_new_tokens='5'"),
        ("b.yaml", "tasks: niah_single\n", "tasks='niah_single': a single string, not a list"),
        ("b.yaml", "lengths: [1k, 2kb]\n", "length '2kb'"),
        ("b.yaml", "recipe: full\nsample: 2\n", "'recipe' (did you mean 'recipes'?), 'sample' (did you mean 'samples'?)"),
        ("b.yaml", "1: 2\n", "unknown key(s) 1"),
        ("b.yaml", b"mode: multi-turn\nout: \xff\n", "is not UTF-8 text (byte 0xff on line 2, offset 22)"),
        ("b.yaml", "- full\n", "holds a list"),
        ("b.yaml", "just words\n", "holds a single string"),
        ("b.yaml", "recipes: [full\n", "cannot parse config file"),
        ("b.toml", "lengths = [1024, 1.5]\n", "item 1.5 is not an integer"),
        ("b.toml", 'tasks = "niah_single"\n', "tasks='niah_single': a single string"),
        ("b.toml", "samples = \n", "cannot parse config file"),
    ],
)
def test_bad_config_files_are_named(tmp_path, name, content, message):
    path = _file(tmp_path, name, content)
    with pytest.raises(kvlab.InputError) as caught:
        load_config_file(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(kvlab.InputError, match="not found"):
        load_config_file(tmp_path / "none.yaml")


def test_help_defaults_come_from_the_fields():
    assert default_help("lengths") == ",".join(format_length(n) for n in QUICK_LENGTHS)
    assert default_help("recipes") == "; ".join(QUICK_RECIPES)
    assert default_help("reference") == "full" and default_help("allow_overflow") == "no"
    assert default_help("samples") == "1" and default_help("max_new_tokens") == "each task's own"
    assert format_length(2048) == "2k" and format_length(1500) == "1500"
