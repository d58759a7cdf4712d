"""Persistent KV: a saved session answers, after loading, token for token as it would have."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kvlab
from tests.conftest import tiny_engine
from tests.reuse.test_session import CONTEXT

QUESTIONS = ("What is the code of the red door?", "Who keeps it?")


@pytest.fixture(scope="module")
def engine(tokenizer):
    return tiny_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048)


@pytest.mark.parametrize("recipe", [
    "full", "snapkv(budget=0.25)", "kivi(bits=2)", "adakv(budget=0.25)", "quest(budget=0.5, page=8)",
    "h2o(budget=0.25)",
])
def test_a_loaded_session_answers_token_for_token(engine, tmp_path, recipe):
    session = engine.session(CONTEXT, recipe=recipe)
    path = tmp_path / "context.kv"
    size = session.save(path)
    assert size > 0 and path.stat().st_size == size
    expected = [session.ask(q, max_new_tokens=8, keep_logprobs=True) for q in QUESTIONS]
    prefilled = engine.counters.prefilled_tokens
    loaded = kvlab.Session.load(engine, path)
    assert engine.counters.prefilled_tokens == prefilled  # read back, not encoded again
    assert loaded.sequence is not session.sequence and loaded.recipe == session.recipe
    got = [loaded.ask(q, max_new_tokens=8, keep_logprobs=True) for q in QUESTIONS]
    assert [a.token_ids for a in got] == [a.token_ids for a in expected]
    for a, b in zip(got, expected):  # the same distributions (float noise aside: memory alignment differs)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
    assert [a.stats.kv_bytes for a in got] == [a.stats.kv_bytes for a in expected]
    assert loaded.context_stats.kv_bytes == session.context_stats.kv_bytes
    # the file holds the cache's bytes (its storages), not a full-size copy of the context
    assert size < session.context_stats.kv_bytes + 64 * 1024


def test_a_multi_turn_session_goes_on_where_it_was_saved(engine, tmp_path):
    session = engine.session(CONTEXT, mode="multi-turn")
    session.ask(QUESTIONS[0], max_new_tokens=5)
    size = session.save(tmp_path / "chat.kv")
    assert size < session.sequence.nbytes() + 64 * 1024  # each storage once (views share it)
    expected = session.ask(QUESTIONS[1], max_new_tokens=5, keep_logprobs=True)
    loaded = kvlab.Session.load(engine, tmp_path / "chat.kv")
    assert loaded.mode == "multi-turn" and loaded.transcript == session.transcript[: len(loaded.transcript)]
    got = loaded.ask(QUESTIONS[1], max_new_tokens=5, keep_logprobs=True)
    assert got.token_ids == expected.token_ids
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-4, rtol=1e-4)
    assert got.stats.prompt_tokens == expected.stats.prompt_tokens


def rewrite_header(path, **changes):
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    header = json.loads(metadata["kvlab"])
    header.update(changes)
    save_file(load_file(str(path)), str(path), metadata={"kvlab": json.dumps(header)})


@pytest.mark.parametrize("field, value, words", [
    ("kvlab_version", "0.0.1", ["another kvlab version", "'0.0.1'"]),
    ("tokenizer_sha256", "0" * 64, ["another tokenizer sha256"]),
    ("model", "other-model", ["another model", "'other-model'", "'model'"]),
    ("format", "kvlab-kv/0", ["format 'kvlab-kv/0'"]),
])
def test_a_file_made_for_something_else_is_refused(engine, tmp_path, field, value, words):
    path = tmp_path / "context.kv"
    engine.session(CONTEXT).save(path)
    rewrite_header(path, **{field: value})
    with pytest.raises(kvlab.InputError) as error:
        kvlab.Session.load(engine, path)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_another_checkpoint_or_recipe_is_refused(engine, tokenizer, tmp_path):
    path = tmp_path / "context.kv"
    engine.session(CONTEXT, recipe="snapkv(budget=0.5)").save(path)
    other = tiny_engine(seed=1, tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048)
    with pytest.raises(kvlab.InputError, match="another model fingerprint"):
        kvlab.Session.load(other, path)
    with pytest.raises(kvlab.InputError, match="another recipe"):
        kvlab.Session.load(engine, path, recipe="snapkv(budget=0.25)")
    kvlab.Session.load(engine, path, recipe="snapkv(budget=0.5)")  # the same recipe, spelled short


def test_not_a_cache_file(engine, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(kvlab.InputError, match="not a kvlab cache file"):
        kvlab.Session.load(engine, path)
    with pytest.raises(kvlab.InputError, match="is not a readable file"):
        kvlab.Session.load(engine, tmp_path / "missing.kv")


def test_cache_save_then_load_from_the_command_line(model_dir, tmp_path):
    from typer.testing import CliRunner

    from kvlab.cli import app

    runner = CliRunner()
    context = tmp_path / "context.txt"
    context.write_text(CONTEXT)
    saved = tmp_path / "context.kv"
    result = runner.invoke(app, ["cache", "save", "--context-file", str(context), "--out", str(saved),
                                 "--recipe", "snapkv(budget=0.5)", "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert "context tokens" in result.output and "MiB of KV" in result.output
    ask = ["--question", "What is the code?", "--max-new-tokens", "4", "--model", str(model_dir), "--json"]
    loaded = runner.invoke(app, ["cache", "load", str(saved), *ask])
    assert loaded.exit_code == 0, loaded.output
    direct = runner.invoke(app, ["ask", "--context-file", str(context), "--recipe", "snapkv(budget=0.5)", *ask])
    answer = json.loads(loaded.stdout)["answers"][0]
    assert answer["answer"] == json.loads(direct.stdout)["answers"][0]["answer"]
    assert answer["stats"]["prefilled_tokens"] < 20  # only the question was prefilled
    refused = runner.invoke(app, ["cache", "load", str(context), *ask])
    assert refused.exit_code == 2 and "not a kvlab cache file" in refused.output
