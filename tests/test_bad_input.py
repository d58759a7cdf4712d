"""The bad-input matrix: every way a hostile user was seen to break kvlab, one row each.

A CLI row is ``(id, argv, message)``: the command must exit with code 2, print ``message``
and no traceback. An API row is ``(id, call, error class, message)``: ``call()`` must raise
that kvlab error with ``message`` in it. Rows are grouped by area; the matrix only grows.

Placeholders in argv are filled by :func:`_fill`: ``{model}`` a tiny model directory,
``{context}`` a small context file, ``{tmp}`` a fresh temporary directory.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvlab
from kvlab.cli import app
from kvlab.engine.loading import converted_gguf, default_gguf
from tests.conftest import tiny_model

runner = CliRunner()

# Rows whose files must exist before the command runs: row id -> a function writing them into
# ``tmp`` (the row's ``{tmp}``), called before the command.
PREPARE: dict[str, Callable[[Path], None]] = {}

# -- recipes ---------------------------------------------------------------------------------
CLI_RECIPES: list[tuple[str, list[str], str]] = [
]
API_RECIPES: list[tuple[str, Callable[..., object], type[Exception], str]] = [
]

# -- the results store and local data (--data, RULER, LongBench, SCBench) ----------------------
CLI_STORE: list[tuple[str, list[str], str]] = [
]

# -- model files and loading ------------------------------------------------------------------
# Each CLI_MODELS row is checked twice: `kvlab ask --model ...` (exit 2) and, as API_MODELS,
# `kvlab.load(...)` (a ModelError); PREPARE writes the broken files first.
def _ask_model(path: str) -> list[str]:
    return ["ask", "--context-file", "{context}", "--question", "Q", "--model", path]


BAD_GGUF, BAD_DIR = _ask_model("{tmp}/bad.gguf"), _ask_model("{tmp}/bad-model")


def _write_gguf(data: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / "bad.gguf").write_bytes(data)
    return write


def _gguf_prefix(n_bytes: int) -> Callable[[Path], None]:
    """The first ``n_bytes`` of the real default model's GGUF file."""
    def write(tmp: Path) -> None:
        with default_gguf().open("rb") as source:
            (tmp / "bad.gguf").write_bytes(source.read(n_bytes))
    return write


def _model_dir(damage: Callable[[Path], object]) -> Callable[[Path], None]:
    """A tiny model saved with save_pretrained, the default tokenizer's files, then ``damage``."""
    def write(tmp: Path) -> None:
        directory = tmp / "bad-model"
        tiny_model().save_pretrained(directory)
        tokenizer_dir = converted_gguf(default_gguf(), progress=False)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, directory / name)
        damage(directory)
    return write


def _truncate(keep: float) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    return damage


def _weights(data: bytes) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(data)
    return damage


def _remove(*names: str) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        for name in names:
            (directory / name).unlink()
    return damage


def _keep_only_config(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name != "config.json":
            path.unlink()


def _a_missing_shard(directory: Path) -> None:
    """Weights listed in model.safetensors.index.json, one of the two shards absent."""
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _only_a_gguf(directory: Path) -> None:
    _keep_only_config(directory)
    (directory / "config.json").rename(directory / "x.gguf")


PREPARE.update({
    "model-gguf-random": _write_gguf(random.Random(0).randbytes(4096)),
    "model-gguf-empty": _write_gguf(b""),
    "model-gguf-header-only": _write_gguf(b"GGUF" + struct.pack("<IQQ", 3, 272, 33)),
    "model-gguf-truncated-metadata": _gguf_prefix(2**20),
    "model-gguf-truncated": _gguf_prefix(8 * 2**20),
    "model-safetensors-random": _model_dir(_weights(random.Random(0).randbytes(4096))),
    "model-safetensors-empty": _model_dir(_weights(b"")),
    "model-safetensors-truncated": _model_dir(_truncate(0.5)),
    "model-safetensors-header-cut": _model_dir(_truncate(0.001)),
    "model-config-only": _model_dir(_keep_only_config),
    "model-no-weights": _model_dir(_remove("model.safetensors")),
    "model-no-tokenizer": _model_dir(_remove("tokenizer.json", "tokenizer_config.json")),
    "model-config-not-json": _model_dir(lambda d: (d / "config.json").write_text("{not json")),
    "model-no-config": _model_dir(_remove("config.json")),
    "model-dir-of-a-gguf": _model_dir(_only_a_gguf),
    "model-index-missing-shard": _model_dir(_a_missing_shard),
})

CLI_MODELS: list[tuple[str, list[str], str]] = [
    ("model-gguf-random", BAD_GGUF,
     "bad.gguf is not a GGUF file: it does not start with the GGUF magic bytes"),
    ("model-gguf-empty", BAD_GGUF, "bad.gguf is empty (0 bytes)"),
    ("model-gguf-header-only", BAD_GGUF,
     "bad.gguf is truncated: it ends at byte 24, inside metadata entry 1 of 33"),
    ("model-gguf-truncated-metadata", BAD_GGUF,
     "bad.gguf is truncated: it ends at byte 1,048,576, inside metadata entry"),
    ("model-gguf-truncated", BAD_GGUF,
     "bad.gguf is truncated: it is 8,388,608 bytes but its 272 tensors need 98,362,432"),
    ("model-gguf-missing", _ask_model("{tmp}/missing.gguf"),
     "not found: give a local transformers model directory"),
    ("model-repo-id", _ask_model("HuggingFaceTB/SmolLM2-135M-Instruct"),
     "kvlab never downloads models"),
    ("model-not-gguf-file", _ask_model("{context}"), "is a file but not a .gguf"),
    ("model-safetensors-random", BAD_DIR, "model.safetensors is not a safetensors file"),
    ("model-safetensors-empty", BAD_DIR, "model.safetensors is empty (0 bytes)"),
    ("model-safetensors-truncated", BAD_DIR, "model.safetensors is truncated: it is"),
    ("model-safetensors-header-cut", BAD_DIR, "but its header alone needs"),
    ("model-config-only", BAD_DIR,
     "it has config.json but no tokenizer files (looked for tokenizer.json, tokenizer.model, "
     "vocab.json, vocab.txt, *.tiktoken) and no weights (looked for model.safetensors,"),
    ("model-no-weights", BAD_DIR,
     "it has config.json but no weights (looked for model.safetensors,"),
    ("model-no-tokenizer", BAD_DIR,
     "it has config.json but no tokenizer files (looked for tokenizer.json,"),
    ("model-config-not-json", BAD_DIR, "config.json is not a readable JSON file"),
    ("model-no-config", BAD_DIR, "has no config.json: give a transformers"),
    ("model-dir-of-a-gguf", BAD_DIR, "has no config.json (it holds x.gguf: pass that file)"),
    ("model-index-missing-shard", BAD_DIR,
     "lists weight files that are missing: model-00002-of-00002.safetensors"),
]


def _load_prepared(row_id: str, argv: list[str]) -> None:
    """``kvlab.load`` on a CLI_MODELS row's ``--model``, its files written into a fresh tmp."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if row_id in PREPARE:
            PREPARE[row_id](tmp)
        context = tmp / "context.txt"
        context.write_text("context")
        model = argv[argv.index("--model") + 1].format(tmp=tmp, context=context)
        kvlab.load(model, progress=False)


API_MODELS: list[tuple[str, Callable[..., object], type[Exception], str]] = [
    (f"load-{row_id}", functools.partial(_load_prepared, row_id, argv), kvlab.ModelError, message)
    for row_id, argv, message in CLI_MODELS
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
API_ROWS = API_RECIPES + API_MODELS + API_TYPES


@pytest.mark.parametrize("argv, message", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input_is_a_clear_error(argv, message, model_dir, tmp_path, request):
    if request.node.callspec.id in PREPARE:
        PREPARE[request.node.callspec.id](tmp_path)
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
