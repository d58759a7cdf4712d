"""The command line: methods, ask, and clear errors (no tracebacks)."""

import json

import pytest
from typer.testing import CliRunner

from kvlab.cli import app

runner = CliRunner()


@pytest.fixture()
def context_file(tmp_path):
    path = tmp_path / "context.txt"
    path.write_text("The code of the red door is 4417. " * 30)
    return path


def test_methods_json_lists_stages_and_parameters():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    methods = {m["name"]: m for m in json.loads(result.stdout)}
    assert methods["snapkv"]["stage"] == "compress"
    assert {p["name"] for p in methods["quest"]["params"]} == {
        "budget", "page", "dense_layers", "sink", "recent",
    }


def test_methods_table():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "self_extend" in result.stdout


def test_ask_json(model_dir, context_file):
    result = runner.invoke(app, [
        "ask", "--context-file", str(context_file), "--question", "What is the code?",
        "--question", "Again?", "--recipe", "snapkv(budget=0.5)", "--model", str(model_dir),
        "--mode", "multi-turn", "--max-new-tokens", "4", "--json",
    ])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["recipe"].startswith("snapkv(budget=0.5")
    assert len(payload["answers"]) == 2
    stats = payload["answers"][0]["stats"]
    assert stats["kv_bytes"] > 0 and stats["new_tokens"] == 4
    assert payload["context"]["kv_tokens"] == pytest.approx(payload["context"]["prompt_tokens"] * 0.5, abs=1)


def test_ask_table(model_dir, context_file):
    result = runner.invoke(app, [
        "ask", "--context-file", str(context_file), "--question", "What is the code?",
        "--model", str(model_dir), "--max-new-tokens", "3",
    ])
    assert result.exit_code == 0, result.output
    assert "KV memory (MiB)" in result.stdout and "prefill (s)" in result.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recipe", "snapkv(budgt=3)"], "no parameter 'budgt'"),
        (["--recipe", "warp(factor=2)"], "unknown method 'warp'"),
        (["--mode", "chat"], "multi-request, multi-turn"),
        (["--model", "/no/such/model"], "not found"),
        (["--device", "tpu"], "device"),
        (["--dtype", "int3"], "dtype"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    ],
)
def test_ask_errors_are_clear(model_dir, context_file, extra, message):
    args = ["ask", "--context-file", str(context_file), "--question", "Q?"]
    if "--model" not in extra:
        args += ["--model", str(model_dir)]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_context_file(tmp_path):
    result = runner.invoke(app, ["ask", "--context-file", str(tmp_path / "none.txt"), "--question", "Q"])
    assert result.exit_code == 2 and "not a readable file" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--tasks", "nope"], "unknown task(s) nope"),
        (["bench", "--lengths", "2kb"], "length '2kb'"),
        (["bench", "--recipes", "full; snapkv(budget=-9)"], "snapkv(budget=-9)"),
        (["bench", "--mode", "chat"], "multi-turn, multi-request"),
        (["bench", "--depths", "0.1,deep"], "depth 'deep'"),
        (["bench", "--config", "/no/such.yaml"], "not found"),
        (["report", "/no/such/dir"], "holds no results.duckdb"),
    ],
)
def test_bench_and_report_errors_are_clear(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bench_runs_and_reports(model_dir, tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, [
        "bench", "--model", str(model_dir), "--tasks", "niah_single", "--lengths", "300",
        "--recipes", "streaming_llm(budget=0.5)", "--max-new-tokens", "3", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and "streaming_llm" in result.output
    again = runner.invoke(app, ["report", str(out)])
    assert again.exit_code == 0 and "report.html" in again.output
    table = runner.invoke(app, ["report", str(out), "--markdown"])
    assert table.exit_code == 0 and "| recipe |" in table.output and "| full |" in table.output


def _no_model_load(monkeypatch):
    import kvlab

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kvlab, "load", refuse)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_max_new_tokens_is_checked_before_the_model_loads(context_file, monkeypatch, value):
    _no_model_load(monkeypatch)
    for args in (["ask", "--context-file", str(context_file), "--question", "Q?"], ["bench"]):
        result = runner.invoke(app, [*args, "--max-new-tokens", value])
        assert result.exit_code == 2, result.output
        assert f"--max-new-tokens {value}: must be an integer >= 1" in result.output


def test_lengths_above_the_cap_are_refused_before_the_model_loads(monkeypatch):
    _no_model_load(monkeypatch)
    result = runner.invoke(app, ["bench", "--lengths", "1k,2000k", "--allow-overflow"])
    assert result.exit_code == 2 and "length 2048000 (2000k): above kvlab bench's cap" in result.output


def test_bench_help_shows_every_default():
    from kvlab.bench.config import QUICK_LENGTHS, QUICK_RECIPES, QUICK_TASKS, format_length

    result = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    for shown in (
        ",".join(format_length(n) for n in QUICK_LENGTHS), "; ".join(QUICK_RECIPES), ",".join(QUICK_TASKS),
        "multi-turn", "kvlab-results", "SmolLM2-135M-Instruct", "each task's own",
    ):
        assert f"[default: {shown}]" in text
    assert "--reference" in text and "[default: full]" in text
    assert "--allow-overflow" in text and "[default: no]" in text
    # every option but --config shows its default: in its help, or typer's own [default: ...]
    import typer

    params = typer.main.get_command(app).commands["bench"].params
    names = {p.name for p in params if "[default:" in (p.help or "") or p.default is not None}
    assert names == {p.name for p in params} - {"config"}


def test_bench_past_the_window_needs_a_reference_or_allow_overflow(model_dir, tmp_path):
    args = ["bench", "--model", str(model_dir), "--recipes", "yarn(factor=2)", "--lengths", "3k",
            "--tasks", "niah_single", "--max-new-tokens", "2", "--no-report"]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2
    assert "--reference 'yarn(factor=2)'" in refused.output and "--allow-overflow" in refused.output
    chosen = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--reference", "yarn(factor=2)"])
    assert chosen.exit_code == 0, chosen.output
    assert "1 rows written" in chosen.output and "fidelity reference: yarn(factor=2)" in chosen.output


def test_bench_reference_and_overflow_from_flags_and_config_files(tmp_path, monkeypatch):
    import kvlab.bench.runner

    seen = []
    monkeypatch.setattr(kvlab.bench.runner, "run_bench", lambda config, **kw: seen.append(config))
    config = tmp_path / "bench.yaml"
    config.write_text("allow_overflow: true\nreference: yarn(factor=2)\n")
    for args in (["--config", str(config)], ["--reference", "yarn(factor=2)", "--allow-overflow"]):
        result = runner.invoke(app, ["bench", *args])
        assert result.exit_code == 0, result.output
        assert seen[-1].allow_overflow is True and seen[-1].reference == "yarn(factor=2)"
    assert runner.invoke(app, ["bench", "--config", str(config), "--reference", "full"]).exit_code == 0
    assert seen[-1].allow_overflow is True and seen[-1].reference == "full"  # the flag wins
    assert runner.invoke(app, ["bench"]).exit_code == 0
    assert seen[-1].allow_overflow is False and seen[-1].reference == "full"


def test_bench_interrupted_says_what_is_kept(model_dir, tmp_path, monkeypatch):
    from kvlab.bench.runner import BenchRunner

    out = tmp_path / "run"
    args = ["bench", "--model", str(model_dir), "--tasks", "niah_single", "--lengths", "300",
            "--recipes", "streaming_llm(budget=0.5)", "--max-new-tokens", "2", "--no-report",
            "--out", str(out)]
    original = BenchRunner._run_pair
    calls = {"n": 0}

    def interrupted_second(self, *pair):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C while the second pair runs
            raise KeyboardInterrupt
        return original(self, *pair)

    monkeypatch.setattr(BenchRunner, "_run_pair", interrupted_second)
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    assert f"interrupted: 1 (case, recipe) pairs kept in {out}; rerun the same command to resume" in result.output
    assert "Traceback" not in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "resuming: 1 (case, recipe) pairs" in again.output and "1 rows written" in again.output


@pytest.mark.parametrize(
    "argv, absent",
    [(["--help"], {"torch", "transformers"}), (["bench", "--help"], {"torch", "transformers"}),
     (["methods"], {"transformers"}), (["tasks"], {"torch", "transformers"})],
)
def test_the_cli_starts_without_heavy_imports(argv, absent):
    """`kvlab --help` answers at once: what it does not need, it does not import (a module
    count, not a timing, so it cannot flake on a loaded machine)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom kvlab.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {sorted(absent)!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-500:]


@pytest.mark.parametrize(("args", "named"), [
    (["--lengths", "3000"], "length 3000"),
    (["--bin", "1"], "bin size 1"),
    (["--recipes", "nosuch"], "nosuch"),
    (["--recipes", "full; gemfilter"], "gemfilter drops prompt tokens"),
])
def test_ppl_refuses_bad_values_naming_them(model_dir, tmp_path, args, named):
    result = runner.invoke(app, ["ppl", "--model", str(model_dir), "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert named in " ".join(result.output.split()) and "Traceback" not in result.output


def test_ppl_writes_rows_and_the_report(model_dir, tmp_path):
    result = runner.invoke(app, [
        "ppl", "--model", str(model_dir), "--out", str(tmp_path), "--recipes", "full; pi(factor=2)",
        "--lengths", "512", "--bin", "256", "--chunk", "128",
    ])
    assert result.exit_code == 0, result.output
    assert "512 'full': last bin ppl" in result.output
    page = (tmp_path / "report.html").read_text()
    assert "Perplexity by position" in page and "pi(factor=2)" in page
    markdown = runner.invoke(app, ["report", str(tmp_path), "--markdown"])
    assert markdown.exit_code == 0, markdown.output
    assert "no accuracy rows" in markdown.output and "| recipe |" not in markdown.output
