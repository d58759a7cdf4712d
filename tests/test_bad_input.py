"""The bad-input matrix: every way a hostile user was seen to break kvlab, one row each.

A CLI row is ``(id, argv, message)``: the command must exit with code 2, print ``message``
and no traceback. An API row is ``(id, call, error class, message)``: ``call()`` must raise
that kvlab error with ``message`` in it. Rows are grouped by area; the matrix only grows.

Placeholders in argv are filled by :func:`_fill`: ``{model}`` a tiny model directory,
``{context}`` a small context file, ``{tmp}`` a fresh temporary directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvlab
from kvlab.cli import app
from tests.conftest import tiny_model

runner = CliRunner()

# -- recipes ---------------------------------------------------------------------------------
CLI_RECIPES: list[tuple[str, list[str], str]] = [
]
API_RECIPES: list[tuple[str, Callable[..., object], type[Exception], str]] = [
]

# -- the results store and local data (--data, RULER, LongBench, SCBench) ----------------------
CLI_STORE: list[tuple[str, list[str], str]] = [
]

# -- model files and loading ------------------------------------------------------------------
CLI_MODELS: list[tuple[str, list[str], str]] = [
]

# -- bench settings: flags and config files ----------------------------------------------------
CLI_BENCH: list[tuple[str, list[str], str]] = [
]

# -- the Python API's types --------------------------------------------------------------------
API_TYPES: list[tuple[str, Callable[..., object], type[Exception], str]] = [
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model(vocab_size=len(tokenizer), max_position_embeddings=2048).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _fill(argv: list[str], model: Path, tmp: Path) -> list[str]:
    context = tmp / "context.txt"
    if not context.exists():
        context.write_text("The code of the red door is 4417. " * 30)
    return [a.format(model=model, context=context, tmp=tmp) for a in argv]


CLI_ROWS = CLI_RECIPES + CLI_STORE + CLI_MODELS + CLI_BENCH
API_ROWS = API_RECIPES + API_TYPES


@pytest.mark.parametrize("argv, message", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input_is_a_clear_error(argv, message, model_dir, tmp_path):
    result = runner.invoke(app, _fill(argv, model_dir, tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "call, error, message", [r[1:] for r in API_ROWS], ids=[r[0] for r in API_ROWS]
)
def test_api_bad_input_is_a_kvlab_error(call, error, message):
    assert issubclass(error, kvlab.KvlabError)
    with pytest.raises(error) as caught:
        call()
    assert message in str(caught.value)
