"""Benchmark settings: from CLI flags, a YAML/TOML file, or the quick-suite defaults.

Every setting is type-checked when a :class:`BenchConfig` is built (from the CLI, a config
file or Python), so a bad value is an :class:`~kvlab.errors.InputError` naming the setting,
the value and what is allowed, never a traceback or a silently wrong run.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlab.bench.lengths import describe_length, format_length, parse_length
from kvlab.errors import InputError, RecipeError

if TYPE_CHECKING:
    from kvlab.recipe import Recipe

MODES = ("multi-turn", "multi-request")
# The quick suite (``kvlab bench`` with no arguments): a question the default model
# (SmolLM2-135M-Instruct) answers with the full cache at this length (one needle in noise, at
# two depths), asked of the methods that differ most, each at 1/2, 1/4 and 1/8 of the cache
# (KeyDiff, which keeps the needle there, on to 1/16 and 1/32, where it loses it; DuoAttention:
# that share of retrieval heads, streaming heads holding 16 sinks + 64 recent entries so that
# the cache shrinks at 1k tokens; KIVI: 4 and 2 bits instead of a budget; Quest: keeps the
# whole cache and reads 1/4 of it per step). 15 recipes x 2 cases = 30 (case, recipe) pairs;
# timings in benchmarks/README.md.
QUICK_RECIPES = (
    "full",
    "snapkv(budget=0.5)", "snapkv(budget=0.25)", "snapkv(budget=0.125)",
    "keydiff(budget=0.5)", "keydiff(budget=0.25)", "keydiff(budget=0.125)",
    "keydiff(budget=0.0625)", "keydiff(budget=0.03125)",
    "duo_attention(retrieval=0.5, sink=16, recent=64)",
    "duo_attention(retrieval=0.25, sink=16, recent=64)",
    "duo_attention(retrieval=0.125, sink=16, recent=64)",
    "kivi(bits=4)", "kivi(bits=2)",
    "quest(budget=0.25)",
)
QUICK_TASKS = ("niah_single",)
QUICK_LENGTHS = (1024,)
QUICK_DEPTHS = (0.25, 0.75)
QUICK_MODE = "multi-turn"
# The longest context length kvlab bench accepts (1024k tokens), whatever the recipes and
# --allow-overflow: past it a generated case alone takes many minutes to build.
MAX_LENGTH = 1_048_576

# list settings: (element type, what is allowed, an example)
_LISTS: dict[str, tuple[type, str, str]] = {
    "recipes": (str, "a list of recipe strings", "['full', 'snapkv(budget=0.25)']"),
    "tasks": (str, "a list of task names (kvlab tasks)", "['niah_single', 'kv_retrieval']"),
    "lengths": (int, "a list of token counts", "[1024, 2048] (in a config file also [1k, 2k])"),
    "depths": (float, "a list of needle depths in [0, 1]", "[0.1, 0.5, 0.9]"),
    "data": (str, "a list of 'PATH:FORMAT' strings", "['niah.jsonl:ruler']"),
}
# scalar settings: (accepted types, what is allowed)
_SCALARS: dict[str, tuple[tuple[type, ...], str]] = {
    "mode": ((str,), f"one of {', '.join(MODES)}"),
    "samples": ((int,), "an integer >= 1"),
    "model": ((str, type(None)), "a model directory or .gguf path, or null for the default model"),
    "device": ((str,), "auto, cpu, cuda or cuda:N"),
    "dtype": ((str,), "auto, float32, bfloat16 or float16"),
    "seed": ((int,), "an integer"),
    "max_new_tokens": ((int, type(None)), "an integer >= 1, or null for each task's own"),
    "out": ((str,), "a directory path"),
    "reference": ((str,), "a recipe string, e.g. 'full' or 'yarn(factor=2)'"),
    "allow_overflow": ((bool,), "true or false"),
    "raw_prompt": ((bool,), "true or false"),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false"}


def _is(value: Any, kind: type) -> bool:
    """``isinstance`` without bool passing for int/float (``True`` is not a length)."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def check_setting(name: str, value: Any) -> Any:
    """``value`` of setting ``name`` with its type checked (and tuples, paths normalised)."""
    if name in _LISTS:
        kind, allowed, example = _LISTS[name]
        if isinstance(value, str):
            raise InputError(
                f"{name}={value!r}: a single string, not a list; must be {allowed}, "
                f"e.g. {name}: {example} (a string is not split into items)"
            )
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{name}={value!r}: must be {allowed}, e.g. {example}")
        for item in value:
            if not _is(item, kind):
                raise InputError(
                    f"{name}={list(value)!r}: item {item!r} is not {_TYPE_NAMES[kind]}; "
                    f"must be {allowed}, e.g. {example}"
                )
        return [float(v) for v in value] if kind is float else list(value)
    if name in _SCALARS:
        kinds, allowed = _SCALARS[name]
        if name in ("model", "out") and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not any(_is(value, k) for k in kinds):
            raise InputError(f"{name}={value!r}: must be {allowed}")
        return value
    raise InputError(f"unknown setting {name!r}; allowed: {', '.join(setting_names())}")


def setting_names() -> list[str]:
    return [f.name for f in fields(BenchConfig)]


@dataclass
class BenchConfig:
    """What ``kvlab bench`` runs. The ``reference`` recipe (default ``full``) runs first for
    each case: it is the reference of the fidelity metrics (token agreement and KL).
    ``allow_overflow`` lets recipes run past the model's context window (lengths stay capped
    at :data:`MAX_LENGTH`)."""

    recipes: list[str] = field(default_factory=lambda: list(QUICK_RECIPES))
    tasks: list[str] | None = None  # None: the quick suite's tasks (and needle depths)
    lengths: list[int] = field(default_factory=lambda: list(QUICK_LENGTHS))
    mode: str = QUICK_MODE
    samples: int = 1
    # None: the quick suite's depths when the tasks are left to the quick suite, else none
    # (each needle case then draws its own depth from the seed)
    depths: list[float] | None = None
    data: list[str] = field(default_factory=list)  # local JSONL files, "path:format[:length]"
    raw_prompt: bool = False  # send RULER --data records as RULER does (no chat template)
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_new_tokens: int | None = None
    out: str = "kvlab-results"
    reference: str = "full"
    allow_overflow: bool = False

    def __post_init__(self) -> None:
        quick_tasks = self.tasks is None
        if quick_tasks:
            self.tasks = list(QUICK_TASKS)
        if self.depths is None:
            self.depths = list(QUICK_DEPTHS) if quick_tasks else []
        self.validate()

    def validate(self) -> None:
        from kvlab.bench.loaders import parse_data_item
        from kvlab.bench.tasks import TASKS
        from kvlab.recipe import parse_recipe  # PyTorch: not imported for `kvlab bench --help`

        for f in fields(self):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))
        if self.mode not in MODES:
            raise InputError(f"mode={self.mode!r}: must be one of {', '.join(MODES)}")
        if not self.recipes:
            raise InputError("no recipes given")
        self.parsed: dict[str, Recipe] = {}
        """Each recipe string of the settings, parsed once (here), by its text."""
        for name, recipe in [*(("recipes", r) for r in self.recipes), ("reference", self.reference)]:
            try:
                self.parsed[recipe] = parse_recipe(recipe)
            except RecipeError as exc:  # name the setting and the recipe, then the bad part
                raise RecipeError(f"{name}: recipe {recipe!r}: {exc}") from None
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise InputError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
        if not self.tasks and not self.data:
            raise InputError("no tasks and no data files given")
        for length in self.lengths:
            if length < 64:
                raise InputError(f"length {length!r}: must be a token count >= 64 (e.g. 1k, 4096)")
            if length > MAX_LENGTH:
                raise InputError(
                    f"length {describe_length(length)}: above kvlab bench's cap of "
                    f"{MAX_LENGTH} tokens ({format_length(MAX_LENGTH)}), even with allow_overflow"
                )
        if self.samples < 1:
            raise InputError(f"samples={self.samples!r}: must be an integer >= 1")
        for depth in self.depths:
            if not 0.0 <= depth <= 1.0:
                raise InputError(f"depth {depth!r}: must be in [0, 1]")
        formats = set()
        for item in self.data:
            path, fmt, _ = parse_data_item(item)
            formats.add(fmt)
            if not Path(path).is_file():
                raise InputError(f"data file {path!r} not found")
        if not isinstance(self.raw_prompt, bool):
            raise InputError(f"raw_prompt={self.raw_prompt!r}: must be true or false")
        if self.raw_prompt and "ruler" not in formats:
            raise InputError(
                "raw_prompt (--raw-prompt) sends RULER records as RULER does (input + "
                "answer_prefix, no chat template); give a RULER file: --data PATH:ruler"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens={self.max_new_tokens}: must be an integer >= 1")

    def reference_recipe(self) -> str:
        """The reference recipe, canonical."""
        return str(self.parsed[self.reference])

    def settings_id(self, model_name: str, device: str) -> str:
        """Identifies what changes results besides the case and the recipe. The reference
        changes the fidelity metrics; it is part of the key when it is not ``full`` (so
        results stored before it could be chosen keep their id)."""
        settings: dict[str, Any] = {
            "model": model_name, "mode": self.mode, "max_new_tokens": self.max_new_tokens,
            "dtype": self.dtype, "device": device,
        }
        reference = self.reference_recipe()
        if reference != "full":
            settings["reference"] = reference
        key = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_help(name: str) -> str:
    """The default of setting ``name`` as ``kvlab bench --help`` shows it (from the fields)."""
    f = next(f for f in fields(BenchConfig) if f.name == name)
    value = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
    if name == "lengths":
        return ",".join(format_length(v) for v in value)
    if name == "recipes":
        return "; ".join(value)
    if name == "tasks" and value is None:
        return ",".join(QUICK_TASKS)
    if name == "depths" and value is None:
        return (f"{','.join(map(str, QUICK_DEPTHS))} with the quick suite's tasks, else a "
                "random depth per case")
    if name == "max_new_tokens":
        return str(value) if value is not None else "each task's own"
    if name == "model":
        return value or "SmolLM2-135M-Instruct"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


def split_list(text: str, separator: str = ",") -> list[str]:
    return [part.strip() for part in text.split(separator) if part.strip()]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or TOML file (same keys as :class:`BenchConfig`), type-checked.

    ``recipes`` may also be one string of recipes separated by ``;``; ``lengths`` items may
    be written ``1k``. Any other string where a list is expected is an error (never split).
    """
    file = Path(path)
    where = f"config file {str(path)!r}"
    if not file.is_file():
        raise InputError(f"{where} not found")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{where} is not UTF-8 text (byte {exc.object[exc.start]:#04x} on line {line}, "
            f"offset {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise InputError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        if file.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes a clear message
        raise InputError(f"cannot parse {where}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a single string", int: "a number", float: "a number"}
        raise InputError(
            f"{where} holds {kind.get(type(data), type(data).__name__)} ({str(data)[:40]!r}), "
            "not a mapping of settings; write one 'key: value' per line, e.g. 'lengths: [1k, 2k]'"
        )
    allowed = setting_names()
    unknown = [key for key in data if key not in allowed]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise InputError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {', '.join(allowed)}")
    try:
        if isinstance(data.get("recipes"), str):
            data["recipes"] = split_list(data["recipes"], ";")
        if isinstance(data.get("lengths"), list):
            data["lengths"] = [parse_length(v) if isinstance(v, str) else v for v in data["lengths"]]
        for key, value in data.items():
            data[key] = check_setting(key, value)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return data
