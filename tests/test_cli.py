"""The command line: methods, ask, and clear errors (no tracebacks)."""

import json

import pytest
from typer.testing import CliRunner

from kvlab.cli import app
from tests.conftest import tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model(vocab_size=len(tokenizer), max_position_embeddings=2048).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
    assert {p["name"] for p in methods["quest"]["params"]} == {"budget", "page", "dense_layers"}


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
