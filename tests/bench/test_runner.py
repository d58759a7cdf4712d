"""The benchmark runner on a tiny model: rows, fidelity, resume, settings, errors."""

import pytest
import torch

import kvlab
from kvlab.bench.config import BenchConfig, load_config_file, parse_length
from kvlab.bench.runner import BenchRunner, mean_kl, token_agreement
from tests.conftest import tiny_engine


@pytest.fixture(scope="module")
def engine(tok):
    return tiny_engine(tokenizer=tok, vocab_size=len(tok), max_position_embeddings=4096)


def config(tmp_path, **overrides):
    settings = dict(recipes=["snapkv(budget=1.0)", "streaming_llm(budget=0.25)"],
                    tasks=["niah_single", "kv_retrieval"], lengths=[300], out=str(tmp_path / "run"),
                    max_new_tokens=4)
    settings.update(overrides)
    return BenchConfig(**settings)


def test_rows_fidelity_and_measurements(engine, tmp_path):
    runner = BenchRunner(config(tmp_path), engine)
    written = runner.run()
    rows = runner.store.rows()
    # niah_single: 1 turn, kv_retrieval: 3 turns; 3 recipes (full is added first)
    assert written == len(rows) == (1 + 3) * 3
    for row in rows:
        assert 0.0 <= row["score"] <= 1.0
        assert row["kv_bytes"] > 0 and row["peak_rss_bytes"] > 0 and row["context_prefill_s"] > 0
        if row["recipe"] == "full":
            assert row["token_agreement"] is None and row["kl"] is None
        else:
            assert 0.0 <= row["token_agreement"] <= 1.0 and row["kl"] >= 0.0
    roomy = [r for r in rows if r["recipe"].startswith("snapkv")]
    assert all(r["token_agreement"] == 1.0 and r["kl"] < 1e-6 for r in roomy)  # budget 1.0 == full
    small = [r for r in rows if r["recipe"].startswith("streaming_llm")]
    full = {(r["case_id"], r["turn"]): r for r in rows if r["recipe"] == "full"}
    assert all(r["kv_bytes"] < full[(r["case_id"], r["turn"])]["kv_bytes"] for r in small)
    assert any(r["kl"] > 1e-4 for r in small)


def test_resume_skips_finished_pairs_and_survives_a_crash(engine, tmp_path, monkeypatch):
    first = BenchRunner(config(tmp_path, recipes=["streaming_llm(budget=0.25)"]), engine)
    calls = {"n": 0}
    original = first.store.add

    def crash_after_two(rows):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        original(rows)

    monkeypatch.setattr(first.store, "add", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    first.store.close()
    stored = BenchRunner(config(tmp_path, recipes=["streaming_llm(budget=0.25)"]), engine)
    assert stored.store.count() == 1 + 1  # niah full + niah streaming (one turn each)
    assert stored.run() == 3 + 3  # only kv_retrieval's two pairs remain
    stored.store.close()
    again = BenchRunner(config(tmp_path, recipes=["streaming_llm(budget=0.25)"]), engine)
    assert again.run() == 0 and again.store.count() == 8
    again.store.close()


def test_other_settings_do_not_overwrite(engine, tmp_path):
    a = BenchRunner(config(tmp_path, tasks=["niah_single"], recipes=["full"]), engine)
    a.run()
    a.store.close()
    b = BenchRunner(config(tmp_path, tasks=["niah_single"], recipes=["full"], mode="multi-request"), engine)
    assert b.run() == 1 and b.store.count() == 2


def test_fidelity_functions():
    assert token_agreement([1, 2, 3, 4], [1, 2, 9]) == 0.5
    logp = torch.log_softmax(torch.randn(3, 10), dim=-1)
    assert mean_kl(logp, logp) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    expected = 0.5 * (torch.log(torch.tensor(0.5 / 0.9)) + torch.log(torch.tensor(0.5 / 0.1)))
    assert mean_kl(p, q) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tasks": ["nope"]}, "unknown task(s) nope"),
        ({"recipes": ["snapkv(budgt=1)"]}, "no parameter 'budgt'"),
        ({"mode": "chat"}, "multi-turn, multi-request"),
        ({"lengths": [10]}, "length 10"),
        ({"samples": 0}, "samples"),
        ({"depths": [1.5]}, "depth"),
        ({"data": ["x.jsonl:csv"]}, "PATH:FORMAT"),
    ],
)
def test_bad_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(kvlab.KvlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(tmp_path, **overrides)


def test_lengths_and_config_files(tmp_path):
    assert parse_length("4k") == 4096 and parse_length("1500") == 1500
    with pytest.raises(kvlab.InputError, match="'4kb'"):
        parse_length("4kb")
    yaml_file = tmp_path / "bench.yaml"
    yaml_file.write_text("recipes: 'full; snapkv(budget=0.5)'\nlengths: [1k, 2k]\nmode: multi-request\n")
    assert load_config_file(yaml_file) == {
        "recipes": ["full", "snapkv(budget=0.5)"], "lengths": [1024, 2048], "mode": "multi-request"
    }
    toml_file = tmp_path / "bench.toml"
    toml_file.write_text('tasks = ["niah_single"]\nsamples = 2\n')
    assert load_config_file(toml_file) == {"tasks": ["niah_single"], "samples": 2}
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: full\n")
    with pytest.raises(kvlab.InputError, match="unknown key.*recipe"):
        load_config_file(bad)
