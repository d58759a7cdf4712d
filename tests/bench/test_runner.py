"""The benchmark runner on a tiny model: rows, fidelity, resume, settings, errors."""

import io
import json

import pytest
import torch
from rich.console import Console

import kvlab
from kvlab.bench.config import BenchConfig, load_config_file, parse_length
from kvlab.bench.loaders import load_jsonl
from kvlab.bench.raw_prompt import RawPromptSession
from kvlab.bench.report import build_report
from kvlab.bench.runner import BenchRunner, build_cases, mean_kl, run_bench, token_agreement
from kvlab.bench.store import ResultStore
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


def test_fidelity_is_measured_against_the_chosen_reference(engine, tmp_path):
    # streaming_llm is the reference: it runs first, full is compared against it
    chosen = BenchRunner(config(tmp_path, tasks=["niah_single"], recipes=["full"],
                                reference="streaming_llm(budget=0.25)"), engine)
    assert [label for _, label in chosen.recipes] == ["streaming_llm(budget=0.25)", "full"]
    chosen.run()
    rows = {r["recipe"]: r for r in chosen.store.rows()}
    chosen.store.close()
    reference = next(r for r in rows if r.startswith("streaming_llm"))
    assert rows[reference]["token_agreement"] is None and rows[reference]["kl"] is None
    assert rows["full"]["token_agreement"] is not None and rows["full"]["kl"] > 1e-4
    # the default reference (full) on the same cases: streaming is the one compared
    default = BenchRunner(config(tmp_path, tasks=["niah_single"], recipes=["streaming_llm(budget=0.25)"]), engine)
    assert default.settings_id != chosen.settings_id  # never mixed with the other reference's rows
    default.run()
    by_reference = {(r["settings_id"], r["recipe"]): r for r in default.store.rows()}
    default.store.close()
    assert by_reference[(default.settings_id, "full")]["kl"] is None
    streaming = by_reference[(default.settings_id, reference)]
    # token agreement is symmetric when both answers have the same length
    assert streaming["token_agreement"] == pytest.approx(rows["full"]["token_agreement"])


@pytest.fixture(scope="module")
def short_engine(tok):
    return tiny_engine(tokenizer=tok, vocab_size=len(tok), max_position_embeddings=512)


def test_lengths_past_a_window_are_refused_before_cases_are_built(short_engine, tmp_path, monkeypatch):
    import kvlab.bench.runner as runner_module

    def no_cases(*args):
        raise AssertionError("cases were built")

    monkeypatch.setattr(runner_module, "build_cases", no_cases)
    with pytest.raises(kvlab.InputError) as caught:
        BenchRunner(config(tmp_path, recipes=["yarn(factor=2)"], lengths=[256, 1024]), short_engine)
    message = str(caught.value)
    assert "length 1024 (1k)" in message and "'full' (512 tokens, the reference)" in message
    assert "--reference 'yarn(factor=2)'" in message and "--allow-overflow" in message
    assert not (tmp_path / "run").exists()  # nothing written for a refused run
    with pytest.raises(kvlab.InputError, match=r"'snapkv\(budget=0.5\)' \(512 tokens\); drop that length"):
        BenchRunner(config(tmp_path, recipes=["snapkv(budget=0.5)"], reference="yarn(factor=2)",
                           lengths=[700]), short_engine)
    with pytest.raises(kvlab.InputError, match="nor yarn at its largest factor"):
        BenchRunner(config(tmp_path, lengths=[1000 * 1024]), short_engine)
    with pytest.raises(kvlab.InputError, match=r"--reference 'yarn\(factor=4\)'"):  # none listed holds it
        BenchRunner(config(tmp_path, lengths=[1500]), short_engine)


def test_past_the_window_with_a_long_reference_or_allow_overflow(short_engine, tmp_path):
    yarn = BenchRunner(config(tmp_path, tasks=["niah_single"], recipes=["yarn(factor=2)"], lengths=[700],
                              reference="yarn(factor=2)", max_new_tokens=2), short_engine)
    assert yarn.run() == 1
    (row,) = yarn.store.rows()
    yarn.store.close()
    assert row["recipe"].startswith("yarn") and row["context_tokens"] > 512 and row["kl"] is None
    overflow = BenchRunner(config(tmp_path, tasks=["niah_single"], recipes=["snapkv(budget=0.5)"],
                                  lengths=[700], allow_overflow=True, max_new_tokens=2,
                                  out=str(tmp_path / "overflow")), short_engine)
    assert overflow.run() == 2
    overflow.store.close()


def test_an_overflow_during_the_run_names_the_case_and_the_bench_options(short_engine, tmp_path):
    # the context fits the window, the question and answer do not: the engine's check, with
    # the case, the recipe and kvlab bench's own options added
    runner = BenchRunner(config(tmp_path, tasks=["niah_single"], recipes=["full"], lengths=[500],
                                max_new_tokens=16), short_engine)
    with pytest.raises(kvlab.InputError) as caught:
        runner.run()
    runner.store.close()
    message = str(caught.value)
    assert message.startswith("case niah_single-500-") and "recipe 'full'" in message
    assert "--reference RECIPE" in message and "--allow-overflow" in message
# -- --data files: every record is a case, no row replaced, resume by case -------------------
NEEDLE = ("Some special magic numbers are hidden within the following text.\n"
          "The grass is green. The sky is blue. One of the special magic numbers for {key} is: "
          "{value}.\nThe sun is yellow. Here we go.\n"
          "What is the special magic number for {key} mentioned in the provided text?")
PREFIX = " The special magic number for {key} mentioned in the provided text is"


def _ruler_file(path, values, key="calm-otter", index=0, **fields):
    """A RULER niah file; every record has the same `index` (as RULER's generator can)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"index": index, "input": NEEDLE.format(key=key, value=v), "outputs": [v],
                "length": 90, "answer_prefix": PREFIX.format(key=key), **fields}
               for v in values]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _data_config(tmp_path, files, **overrides):
    return config(tmp_path, tasks=[], data=[f"{f}:ruler" for f in files],
                  recipes=["streaming_llm(budget=0.5)"], **overrides)


def test_same_named_files_and_repeated_indices_all_load_whole(engine, tmp_path):
    short = _ruler_file(tmp_path / "2048" / "data" / "niah_single_1" / "validation.jsonl",
                        ["1111111", "2222222"])
    long = _ruler_file(tmp_path / "4096" / "data" / "niah_single_1" / "validation.jsonl",
                       ["3333333", "4444444"])
    log = io.StringIO()
    run_bench(_data_config(tmp_path, [short, long]), engine, Console(file=log, width=200),
              report=False)
    with ResultStore(tmp_path / "run", read_only=True) as store:
        rows = store.rows()
    assert "8 rows written" in log.getvalue()  # 4 cases x (full + streaming_llm), 1 turn
    assert len(rows) == 8 and len({r["case_id"] for r in rows}) == 4
    gold = {(r["target_tokens"], r["gold"]) for r in rows}
    assert gold == {(2048, '["1111111"]'), (2048, '["2222222"]'),
                    (4096, '["3333333"]'), (4096, '["4444444"]')}
    # a rerun with one of the files resumes it (its own rows), runs nothing
    again = BenchRunner(_data_config(tmp_path, [long]), engine)
    assert again.pending(build_cases(again.config, engine.tokenizer)) == []
    assert again.run() == 0 and again.store.count() == 8
    again.store.close()
    # a third file of the same name elsewhere is new: only its pairs run
    other = _ruler_file(tmp_path / "copy" / "2048" / "data" / "niah_single_1" /
                        "validation.jsonl", ["1111111"])
    third = BenchRunner(_data_config(tmp_path, [short, long, other]), engine)
    assert third.run() == 2 and third.store.count() == 10
    third.store.close()


def test_rows_written_equals_rows_stored(engine, tmp_path):
    log = io.StringIO()
    run_bench(config(tmp_path, tasks=["niah_single"], recipes=["streaming_llm(budget=0.5)"]),
              engine, Console(file=log, width=200), report=False)
    with ResultStore(tmp_path / "run", read_only=True) as store:
        stored = store.count()
    assert stored == 2 and f"{stored} rows written" in log.getvalue()


def test_a_case_listed_twice_is_refused(engine, tmp_path):
    path = _ruler_file(tmp_path / "niah.jsonl", ["1234567"])
    with pytest.raises(kvlab.InputError, match="given twice"):
        build_cases(_data_config(tmp_path, [path, tmp_path / "." / "niah.jsonl"]), engine.tokenizer)
    with pytest.raises(kvlab.InputError, match="would run twice"):
        build_cases(config(tmp_path, tasks=["niah_single", "niah_single"]), engine.tokenizer)


# -- RULER's prompt, exactly ------------------------------------------------------------------
def test_raw_prompt_feeds_rulers_exact_ids(engine, tok, tmp_path):
    path = _ruler_file(tmp_path / "4096" / "data" / "niah_single_1" / "validation.jsonl",
                       ["7654321"])
    (case,) = load_jsonl(path, "ruler", raw_prompt=True)
    (turn,) = case.turns
    record = json.loads(path.read_text())
    prompt = record["input"] + record["answer_prefix"]  # what RULER's call_api.py sends
    ruler_ids = tok(prompt)["input_ids"]
    before = engine.counters.prefilled_tokens
    session = RawPromptSession(engine, case.context, "full")
    answer = session.ask(turn.question, answer_prefix=turn.answer_prefix, max_new_tokens=4)
    assert engine.counters.prefilled_tokens - before == len(ruler_ids)
    assert answer.stats.prompt_tokens == len(ruler_ids)
    assert answer.token_ids == engine.generate_ids(ruler_ids, "full", max_new_tokens=4).token_ids


def test_bench_raw_prompt_rows_and_report(engine, tmp_path):
    # RULER's niah fields: input + answer tokens (128 to generate), the needle's token offset
    path = _ruler_file(tmp_path / "4096" / "data" / "niah_single_1" / "validation.jsonl",
                       ["7654321"], length=80 + 128, token_position_answer=20)
    raw = BenchRunner(_data_config(tmp_path, [path], raw_prompt=True), engine)
    assert raw.run() == 2
    raw.store.close()
    chat = BenchRunner(_data_config(tmp_path, [path]), engine)
    assert chat.run() == 2  # the chat-template twin is another case
    chat.store.close()
    with ResultStore(tmp_path / "run", read_only=True) as store:
        rows = store.rows()
    forms = {r["prompt"]: r for r in rows if r["recipe"] == "full"}
    assert set(forms) == {"raw", "chat"}
    assert forms["raw"]["context_tokens"] < forms["chat"]["context_tokens"]  # no template
    assert {(r["target_tokens"], r["depth"]) for r in rows} == {(4096, 0.25)}
    page = build_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "raw, as RULER sends it" in page and "the model&#x27;s chat template" in page
    assert 'alt="needle heat maps"' in page  # RULER's niah rows have a depth
    with pytest.raises(kvlab.InputError, match="give a RULER file"):
        config(tmp_path, raw_prompt=True)


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
