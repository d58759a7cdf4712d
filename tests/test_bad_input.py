"""The bad-input matrix: every way a hostile user was seen to break kvlab, one row each.

A CLI row is ``(id, argv, message)``: the command must exit with code 2, print ``message``
and no traceback. An API row is ``(id, call, error class, message)``: ``call()`` must raise
that kvlab error with ``message`` in it. Rows are grouped by area; the matrix only grows.

Placeholders in argv are filled by :func:`_fill`: ``{model}`` a tiny model directory,
``{context}`` a small context file, ``{tmp}`` a fresh temporary directory. A row whose
command needs a file prepared (a bad config, a corrupt store) names a function in
``PREPARE`` (keyed by row id), called with ``tmp`` before the command.
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
import torch
from typer.testing import CliRunner

import kvlab
from kvlab.cli import app
from kvlab.errors import InputError, RecipeError
from kvlab.recipe import Recipe, parse_recipe
from kvlab.engine.loading import converted_gguf, default_gguf
from tests.conftest import tiny_model

runner = CliRunner()
_MADE: dict[str, object] = {}


def engine() -> kvlab.Engine:
    """A tiny random model with the real tokenizer (256-token window), made once."""
    if "engine" not in _MADE:
        from transformers import AutoTokenizer

        from kvlab.engine.loading import converted_gguf, default_gguf

        tokenizer = AutoTokenizer.from_pretrained(converted_gguf(default_gguf()))
        model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=256)
        _MADE["engine"] = kvlab.Engine(model, tokenizer, progress=False)
    return _MADE["engine"]  # type: ignore[return-value]


def session() -> kvlab.Session:
    return engine().session("The code of the red door is 4417. " * 3)


def method(name: str, **params):
    from kvlab.registry import method_class

    return method_class(name)(**params)


MANY_TERMS = " + ".join(["snapkv"] * 1000)

# row id -> prepares the row's files in ``tmp`` (the directory ``{tmp}`` names)
PREPARE: dict[str, Callable[[Path], None]] = {}


def _writes(name: str, content: str | bytes) -> Callable[[Path], None]:
    """A PREPARE hook writing ``content`` to ``tmp / name``."""

    def prepare(tmp: Path) -> None:
        target = tmp / name
        target.write_bytes(content if isinstance(content, bytes) else content.encode())

    return prepare


# -- recipes ---------------------------------------------------------------------------------
ASK = ["ask", "--context-file", "{context}", "--question", "Q?", "--model", "{model}"]
CLI_RECIPES: list[tuple[str, list[str], str]] = [
    ("recipe-1000-terms", [*ASK, "--recipe", MANY_TERMS], "at most 6 methods"),
    ("recipe-duplicate-parameter", [*ASK, "--recipe", "snapkv(budget=0.25, budget=0.5)"], "given twice"),
    ("recipe-budget-1e23", [*ASK, "--recipe", f"snapkv(budget={10**23})"], "<= 16777216"),
]
API_RECIPES: list[tuple[str, Callable[..., object], type[Exception], str]] = [
    ("recipe-1000-terms", lambda: parse_recipe(MANY_TERMS), RecipeError, "at most 6 methods"),
    ("recipe-too-long", lambda: parse_recipe("snapkv(window=" + "1" * 3000 + ")"), RecipeError, "at most 2000"),
    ("recipe-duplicate-parameter", lambda: parse_recipe("snapkv(budget=0.25, budget=0.5)"), RecipeError, "'budget' is given twice"),
    ("recipe-budget-1e23", lambda: parse_recipe(f"snapkv(budget={10**23})"), RecipeError, "<= 16777216"),
    ("recipe-not-a-string", lambda: parse_recipe(123), RecipeError, "recipe=123"),
    ("recipe-method-in-the-wrong-stage", lambda: Recipe(compress=method("yarn")), RecipeError, "takes a compress method"),
    ("recipe-not-a-method", lambda: Recipe(retrieve="quest"), RecipeError, "takes a retrieve method"),
    ("recipe-shadowkv-rank-0", lambda: parse_recipe("shadowkv(rank=0)"), RecipeError, "shadowkv(rank=0): must be >= 1"),
    ("recipe-a2ats-codewords-300", lambda: parse_recipe("a2ats(codewords=300)"), RecipeError, "<= 256"),
    (
        "recipe-built-incompatible",
        lambda: Recipe(position=method("self_extend"), retrieve=method("quest")),
        RecipeError, "keeps keys before RoPE",
    ),
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
    ("bench-config-recipes-int", ["bench", "--config", "{tmp}/b.yaml"], "recipes=5: must be a list"),
    ("bench-config-depths-str", ["bench", "--config", "{tmp}/b.yaml"], "item 'a' is not a number"),
    ("bench-config-max-new-tokens-str", ["bench", "--config", "{tmp}/b.yaml"],
     "max_new_tokens='5': must be an integer >= 1"),
    ("bench-config-tasks-string", ["bench", "--config", "{tmp}/b.yaml"],
     "tasks='niah_single': a single string, not a list"),
    ("bench-config-lengths-string", ["bench", "--config", "{tmp}/b.yaml"], "lengths='1k,2k': a single string"),
    ("bench-config-unknown-key", ["bench", "--config", "{tmp}/b.yaml"], "'recipe' (did you mean 'recipes'?)"),
    ("bench-config-not-utf8", ["bench", "--config", "{tmp}/b.yaml"], "is not UTF-8 text"),
    ("bench-config-not-mapping", ["bench", "--config", "{tmp}/b.yaml"], "not a mapping of settings"),
    ("bench-config-toml-element", ["bench", "--config", "{tmp}/b.toml"], "item 1.5 is not an integer"),
    ("bench-config-toml-syntax", ["bench", "--config", "{tmp}/b.toml"], "cannot parse config file"),
    ("bench-config-overflow-str", ["bench", "--config", "{tmp}/b.yaml"], "allow_overflow='yes': must be true or false"),
    ("bench-config-reference-bad", ["bench", "--config", "{tmp}/b.yaml"], "unknown method 'warp'"),
    ("bench-max-new-tokens-0", ["bench", "--max-new-tokens", "0"], "--max-new-tokens 0: must be an integer >= 1"),
    ("bench-max-new-tokens-negative", ["bench", "--max-new-tokens", "-3"], "--max-new-tokens -3"),
    ("ask-max-new-tokens-0", ["ask", "--context-file", "{context}", "--question", "Q?", "--model", "{model}",
                              "--max-new-tokens", "0"], "--max-new-tokens 0: must be an integer >= 1"),
    ("bench-lengths-over-cap", ["bench", "--lengths", "1025k"], "above kvlab bench's cap of 1048576 tokens"),
    ("bench-lengths-1000k", ["bench", "--model", "{model}", "--lengths", "1000k", "--out", "{tmp}/run"],
     "length 1024000 (1000k) exceeds the context window"),
    ("bench-past-window", ["bench", "--model", "{model}", "--recipes", "yarn(factor=2)", "--lengths", "3k",
                           "--out", "{tmp}/run"], "--reference 'yarn(factor=2)'"),
    ("bench-reference-unknown", ["bench", "--reference", "warp(factor=2)"], "unknown method 'warp'"),
    ("bench-dtype-unknown", ["bench", "--model", "{model}", "--dtype", "fp8", "--out", "{tmp}/run"],
     "dtype='fp8': use one of auto, float32, bfloat16, float16"),
    ("bench-dtype-float16-on-cpu", ["bench", "--model", "{model}", "--device", "cpu", "--dtype", "float16",
                                    "--out", "{tmp}/run"], "float16 runs on CUDA only"),
]
PREPARE.update({
    "bench-config-recipes-int": _writes("b.yaml", "recipes: 5\n"),
    "bench-config-depths-str": _writes("b.yaml", "depths: [\"a\"]\n"),
    "bench-config-max-new-tokens-str": _writes("b.yaml", "max_new_tokens: \"5\"\n"),
    "bench-config-tasks-string": _writes("b.yaml", "tasks: niah_single\n"),
    "bench-config-lengths-string": _writes("b.yaml", "lengths: 1k,2k\n"),
    "bench-config-unknown-key": _writes("b.yaml", "recipe: full\n"),
    "bench-config-not-utf8": _writes("b.yaml", b"mode: multi-turn\nout: r\xe9sultats\n"),
    "bench-config-not-mapping": _writes("b.yaml", "- full\n- snapkv(budget=0.5)\n"),
    "bench-config-toml-element": _writes("b.toml", "lengths = [1024, 1.5]\n"),
    "bench-config-toml-syntax": _writes("b.toml", "lengths = [1024\n"),
    "bench-config-overflow-str": _writes("b.yaml", "allow_overflow: \"yes\"\n"),
    "bench-config-reference-bad": _writes("b.yaml", "reference: warp(factor=2)\n"),
})

# -- the Python API's types --------------------------------------------------------------------
API_TYPES: list[tuple[str, Callable[..., object], type[Exception], str]] = [
    ("ask-question-none", lambda: session().ask(None), InputError, "question=None: must be a string"),
    ("ask-question-bytes", lambda: session().ask(b"What?"), InputError, "question=b'What?': must be a string"),
    ("ask-answer-prefix-int", lambda: session().ask("Q?", answer_prefix=3), InputError, "answer_prefix=3"),
    ("ask-max-new-tokens-0", lambda: session().ask("Q?", max_new_tokens=0), InputError, "max_new_tokens=0"),
    ("ask-max-new-tokens-str", lambda: session().ask("Q?", max_new_tokens="5"), InputError, "max_new_tokens='5'"),
    ("generate-recipe-123", lambda: engine().generate("Hi", recipe=123), RecipeError, "recipe=123"),
    ("generate-prompt-none", lambda: engine().generate(None), InputError, "prompt=None"),
    ("generate-prompt-empty", lambda: engine().generate("  "), InputError, "the prompt is empty"),
    ("generate-ids-not-ints", lambda: engine().generate_ids(["a"]), InputError, "token ids"),
    ("session-context-bytes", lambda: engine().session(b"text"), InputError, "context=b'text'"),
    ("session-recipe-123", lambda: engine().session("text", recipe=123), RecipeError, "recipe=123"),
    ("session-mode-unknown", lambda: engine().session("text", mode="chat"), InputError, "multi-request, multi-turn"),
    (
        "overflow-names-the-given-max-new-tokens",
        lambda: engine().generate_ids([1] * 250, max_new_tokens=64), InputError,
        "250 prompt tokens + max_new_tokens 64 = 314 tokens exceed the 256-token window",
    ),
    (
        "overflow-suggests-a-factor-yarn-has",
        lambda: engine().generate_ids([1] * 600, max_new_tokens=4), InputError, "'yarn(factor=4)'",
    ),
    ("load-dtype-unknown", lambda: kvlab.load(dtype="int3", progress=False), InputError,
     "dtype='int3': use one of auto, float32, bfloat16, float16"),
    ("load-dtype-torch-unknown", lambda: kvlab.load(dtype=torch.int8, progress=False), InputError,
     "dtype=torch.int8: use one of float32, bfloat16, float16"),
    ("load-dtype-float16-on-cpu", lambda: kvlab.load(device="cpu", dtype="float16", progress=False),
     InputError, "dtype=float16 on cpu: float16 runs on CUDA only; on the CPU use bfloat16"),
    (
        "overflow-beyond-every-position-method",
        lambda: engine().generate_ids([1] * (256 * 64 + 1), max_new_tokens=4), InputError,
        "no position method reaches 16389 tokens",
    ),
]


def _fill(argv: list[str], model: Path, tmp: Path) -> list[str]:
    context = tmp / "context.txt"
    if not context.exists():
        context.write_text("The code of the red door is 4417. " * 30)
    return [a.format(model=model, context=context, tmp=tmp) for a in argv]


CLI_ROWS = CLI_RECIPES + CLI_STORE + CLI_MODELS + CLI_BENCH
API_ROWS = API_RECIPES + API_MODELS + API_TYPES


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
