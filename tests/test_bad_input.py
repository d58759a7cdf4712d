"""The bad-input matrix: every way a hostile user was seen to break kvlab, one row each.

A CLI row is ``(id, argv, message)``: the command must exit with code 2, print ``message``
and no traceback. An API row is ``(id, call, error class, message)``: ``call()`` must raise
that kvlab error with ``message`` in it. Rows are grouped by area; the matrix only grows.

Placeholders in argv are filled by :func:`_fill`: ``{model}`` a tiny model directory,
``{context}`` a small context file, ``{tmp}`` a fresh temporary directory. A row whose id is
a key of :data:`PREPARE` has that function called with ``tmp`` first (to write the files it
needs).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvlab
from kvlab.cli import app
from tests.conftest import tiny_model

runner = CliRunner()

# row id -> a function called with the row's tmp directory before the command runs
PREPARE: dict[str, Callable[[Path], None]] = {}

# -- recipes ---------------------------------------------------------------------------------
CLI_RECIPES: list[tuple[str, list[str], str]] = [
]
API_RECIPES: list[tuple[str, Callable[..., object], type[Exception], str]] = [
]

# -- the results store and local data (--data, RULER, LongBench, SCBench) ----------------------
# (another process holding the store's lock: tests/bench/test_store.py, it needs a second one)
_BENCH = ["bench", "--model", "{model}", "--tasks", "niah_single", "--lengths", "64",
          "--recipes", "full", "--max-new-tokens", "1", "--no-report"]
_NEEDLE = {"index": 0, "input": "The code is 4417.\nWhat is the code?", "outputs": ["4417"]}


def _store(tmp: Path) -> None:
    from tests.bench.test_summary import synthetic_pairs, write_store

    write_store(tmp / "out", synthetic_pairs())


def _db_bytes(make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Writes tmp/out/results.duckdb as ``make(bytes of a real store)``."""
    def prepare(tmp: Path) -> None:
        _store(tmp)
        db = tmp / "out" / "results.duckdb"
        db.write_bytes(make(db.read_bytes()))
    return prepare


def _other_duckdb(tmp: Path) -> None:
    import duckdb

    (tmp / "out").mkdir()
    duckdb.connect(str(tmp / "out" / "results.duckdb")).close()


def _data(content: bytes, name: str = "niah.jsonl") -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_bytes(content)


_GOOD_LINE = json.dumps(_NEEDLE).encode() + b"\n"
PREPARE.update({
    "store-garbage-bench": _db_bytes(lambda data: bytes(range(256)) * 16),
    "store-garbage-report": _db_bytes(lambda data: bytes(range(256)) * 16),
    "store-empty-file-bench": _db_bytes(lambda data: b""),
    "store-truncated-report": _db_bytes(lambda data: data[: len(data) // 2]),
    "store-truncated-bench": _db_bytes(lambda data: data[: len(data) // 2]),
    "store-header-only-report": _db_bytes(lambda data: data[:4096]),
    "store-not-kvlab-report": _other_duckdb,
    "report-output-read-only": _store,
    "data-not-utf8": _data(_GOOD_LINE + _GOOD_LINE.replace(b"code", b"c\xf6de", 1)),
    "data-utf16": _data("\n".join([json.dumps(_NEEDLE)]).encode("utf-16")),
    "data-file-twice": _data(_GOOD_LINE),
})
CLI_STORE: list[tuple[str, list[str], str]] = [
    ("store-garbage-bench", [*_BENCH, "--out", "{tmp}/out"], "is corrupt or truncated"),
    ("store-garbage-report", ["report", "{tmp}/out"], "kvlab left it untouched"),
    ("store-empty-file-bench", [*_BENCH, "--out", "{tmp}/out"], "is corrupt or truncated"),
    ("store-truncated-report", ["report", "{tmp}/out"], "is corrupt or truncated"),
    ("store-truncated-bench", [*_BENCH, "--out", "{tmp}/out"], "is corrupt or truncated"),
    ("store-header-only-report", ["report", "{tmp}/out"], "is corrupt or truncated"),
    ("store-not-kvlab-report", ["report", "{tmp}/out"], "holds no kvlab results table"),
    ("store-out-is-a-file", [*_BENCH, "--out", "{context}"], "is a file, not a directory"),
    ("store-read-only-out", [*_BENCH, "--out", "/sys/kernel"], "pick a writable --out"),
    ("store-read-only-out-missing", [*_BENCH, "--out", "/sys/kernel/kvlab"],
     "pick a writable --out"),
    ("report-output-read-only", ["report", "{tmp}/out", "--output", "/sys/kernel/r.html"],
     "write it elsewhere with --output FILE"),
    ("data-not-utf8", [*_BENCH, "--data", "{tmp}/niah.jsonl:ruler"],
     "niah.jsonl: line 2: not UTF-8 text (byte 0xf6"),
    ("data-utf16", [*_BENCH, "--data", "{tmp}/niah.jsonl:ruler"],
     "niah.jsonl: line 1: not UTF-8 text"),
    ("data-file-twice", [*_BENCH, "--data", "{tmp}/niah.jsonl:ruler", "--data",
                         "{tmp}/./niah.jsonl:ruler"], "is given twice"),
    ("data-length-not-ruler", [*_BENCH, "--data", "{tmp}/x.jsonl:scbench:4k"],
     "only ruler files take a :LENGTH"),
    ("data-bad-length", [*_BENCH, "--data", "{tmp}/x.jsonl:ruler:4kb"], "length '4kb'"),
    ("raw-prompt-without-ruler", [*_BENCH, "--raw-prompt"], "give a RULER file"),
    ("case-listed-twice", [*_BENCH[:3], "--tasks", "niah_single,niah_single", *_BENCH[5:]],
     "would run twice"),
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


@pytest.mark.parametrize("row_id, argv, message", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input_is_a_clear_error(row_id, argv, message, model_dir, tmp_path):
    if row_id in PREPARE:
        PREPARE[row_id](tmp_path)
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
