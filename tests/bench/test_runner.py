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


def test_progress_total_is_known_and_each_pair_prints_a_line(engine, tmp_path):
    import re

    from rich.console import Console

    console = Console(record=True, width=80, force_terminal=True, color_system=None)
    settings = config(tmp_path, tasks=["niah_single"], depths=[0.25, 0.75], recipes=[
        "snapkv(budget=1.0)", "duo_attention(retrieval=0.125, sink=16, recent=64)"])
    runner = BenchRunner(settings, engine, console)
    runner.run()
    task = runner.progress.tasks[0]
    # 2 depths x 3 recipes (full first): the total is set before the first pair runs
    assert task.total == 6 and task.completed == 6
    text = console.export_text()
    assert "ETA -:--:--" in text and re.search(r"6/6 +\d:\d\d:\d\d +ETA 0:00:00", text)
    # the live bar's frames are recorded too (without newlines): search, not split, the text
    heads = re.findall(r"\[(\d)/6\] (.+?)(?: \| |\n    )(niah_single-300\S*) \| acc (\d+)% \| "
                       r"KV (\d+\.\d) MiB \| (\d+\.\d) s", text)
    labels = ["full", "snapkv(budget=1.0)", "duo_attention(retrieval=0.125, sink=16, recent=64)"]
    assert [(int(h[0]), h[1]) for h in heads] == [(i + 1, labels[i % 3]) for i in range(6)]
    runner.store.close()


def test_pair_lines_fit_in_80_columns():
    from kvlab.bench.runner import pair_line

    rows = [{"score": 1.0, "kv_bytes": 9.6 * 2**20}, {"score": 0.0, "kv_bytes": 10 * 2**20}]
    short = pair_line(3, 26, "niah_single-1024-0-0-d0.25", "full", rows, 12.34)
    assert short == "[3/26] full | niah_single-1024-0-0-d0.25 | acc 50% | KV 10.0 MiB | 12.3 s"
    long = pair_line(10, 26, "niah_single-1024-0-0-d0.25",
                     "duo_attention(retrieval=0.125, sink=16, recent=64)", rows, 12.34)
    assert long.splitlines() == ["[10/26] duo_attention(retrieval=0.125, sink=16, recent=64)",
                                 "    niah_single-1024-0-0-d0.25 | acc 50% | KV 10.0 MiB | 12.3 s"]
    assert all(len(line) <= 80 for line in short.splitlines() + long.splitlines())


def test_eta_comes_from_the_mean_pace():
    from types import SimpleNamespace

    from kvlab.bench.runner import AverageRemainingColumn

    column = AverageRemainingColumn()
    task = SimpleNamespace(total=10, completed=2, elapsed=20.0)
    assert column.render(task).plain == "ETA 0:01:20"  # 10 s per pair, 8 pairs left
    assert column.render(SimpleNamespace(total=10, completed=0, elapsed=5.0)).plain == "ETA -:--:--"
    assert column.render(SimpleNamespace(total=4, completed=4, elapsed=9.0)).plain == "ETA 0:00:00"


def test_a_busy_machine_runs_one_torch_thread(monkeypatch):
    from rich.console import Console

    from kvlab.bench import runner

    console = Console(record=True, width=80)
    threads = {"n": 2}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runner.torch, "get_num_threads", lambda: threads["n"])
    monkeypatch.setattr(runner.torch, "set_num_threads", lambda n: threads.update(n=n))
    load = {"now": 2.0}  # this run's own 2 threads
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (load["now"], 1.0, 1.0))
    runner.threads_for_load(console, 2)
    assert threads["n"] == 2 and console.export_text() == ""  # idle: torch keeps its threads
    load["now"] = 7.5
    runner.threads_for_load(console, 2)
    assert threads["n"] == 1
    assert "load average 7.5 on 2 cores): torch runs 1 thread" in console.export_text()
    load["now"] = 1.7  # 1 of it is this run's own thread: other jobs still hold 0.7 of a core
    runner.threads_for_load(console, 2)
    assert threads["n"] == 1
    load["now"] = 1.3  # the other jobs ended: back to torch's choice
    runner.threads_for_load(console, 2)
    assert threads["n"] == 2 and "down to 1.3 on 2 cores: torch runs 2 threads" in console.export_text()
    load["now"] = 2.6  # this run's 2 threads and less than a core of others: no change
    runner.threads_for_load(console, 2)
    assert threads["n"] == 2
    load["now"] = 7.5
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    runner.threads_for_load(console, 2)
    assert threads["n"] == 2  # the user's choice wins


def test_the_example_config_file_is_valid():
    from pathlib import Path

    settings = load_config_file(Path(__file__).parents[2] / "benchmarks" / "example.yaml")
    config = BenchConfig(**settings)
    assert config.recipes[0] == "full" and len(config.recipes) == 3
    assert config.tasks == ["niah_single", "niah_multiturn"] and config.lengths == [1024]
    assert config.depths == [0.25, 0.75] and config.mode == "multi-turn"


def test_the_quick_suite_defaults():
    from kvlab.bench.config import QUICK_DEPTHS, QUICK_RECIPES, QUICK_TASKS

    quick = BenchConfig()
    assert quick.recipes == list(QUICK_RECIPES) and quick.tasks == list(QUICK_TASKS)
    assert quick.depths == list(QUICK_DEPTHS)  # the quick suite's needles sit at fixed depths
    assert BenchConfig(tasks=["niah_single"]).depths == []  # tasks chosen: no default depths
    # a budget sweep of each compress method: 1/2, 1/4 and 1/8 of the cache
    for method in ("snapkv", "keydiff"):
        assert [r for r in QUICK_RECIPES if r.startswith(method)][:3] == [
            f"{method}(budget={b})" for b in (0.5, 0.25, 0.125)]
    assert sum(r.startswith("duo_attention(retrieval=") for r in QUICK_RECIPES) == 3
