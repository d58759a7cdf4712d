"""Benchmark settings: from CLI flags, a YAML/TOML file, or the quick-suite defaults."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvlab.errors import InputError
from kvlab.recipe import parse_recipe

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


@dataclass
class BenchConfig:
    """What ``kvlab bench`` runs. ``full`` is always run first for each case: it is the
    reference of the fidelity metrics (token agreement and KL)."""

    recipes: list[str] = field(default_factory=lambda: list(QUICK_RECIPES))
    tasks: list[str] | None = None  # None: the quick suite's tasks (and needle depths)
    lengths: list[int] = field(default_factory=lambda: list(QUICK_LENGTHS))
    mode: str = QUICK_MODE
    samples: int = 1
    # None: the quick suite's depths when the tasks are left to the quick suite, else none
    # (each needle case then draws its own depth from the seed)
    depths: list[float] | None = None
    data: list[str] = field(default_factory=list)  # local JSONL files, "path:format"
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_new_tokens: int | None = None
    out: str = "kvlab-results"

    def __post_init__(self) -> None:
        quick_tasks = self.tasks is None
        if quick_tasks:
            self.tasks = list(QUICK_TASKS)
        if self.depths is None:
            self.depths = list(QUICK_DEPTHS) if quick_tasks else []
        self.validate()

    def validate(self) -> None:
        from kvlab.bench.loaders import FORMATS
        from kvlab.bench.tasks import TASKS

        if self.mode not in MODES:
            raise InputError(f"mode={self.mode!r}: must be one of {', '.join(MODES)}")
        if not self.recipes:
            raise InputError("no recipes given")
        for recipe in self.recipes:
            parse_recipe(recipe)  # raises RecipeError naming the bad part
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise InputError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
        if not self.tasks and not self.data:
            raise InputError("no tasks and no data files given")
        for length in self.lengths:
            if isinstance(length, bool) or not isinstance(length, int) or length < 64:
                raise InputError(f"length {length!r}: must be a token count >= 64 (e.g. 1k, 4096)")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise InputError(f"samples={self.samples!r}: must be an integer >= 1")
        for depth in self.depths:
            if not 0.0 <= depth <= 1.0:
                raise InputError(f"depth {depth!r}: must be in [0, 1]")
        for item in self.data:
            path, _, fmt = item.rpartition(":")
            if not path or fmt not in FORMATS:
                raise InputError(f"data {item!r}: write PATH:FORMAT with FORMAT one of {', '.join(FORMATS)}")
            if not Path(path).is_file():
                raise InputError(f"data file {path!r} not found")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")

    def settings_id(self, model_name: str, device: str) -> str:
        """Identifies what changes results besides the case and the recipe."""
        key = json.dumps(
            {"model": model_name, "mode": self.mode, "max_new_tokens": self.max_new_tokens,
             "dtype": self.dtype, "device": device},
            sort_keys=True,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_length(text: str) -> int:
    """``4k`` -> 4096, ``128k`` -> 131072, ``1500`` -> 1500."""
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not match:
        raise InputError(f"length {text!r}: write a token count such as 1500, 1k or 4k")
    value = int(match.group(1))
    return value * 1024 if match.group(2) else value


def split_list(text: str, separator: str = ",") -> list[str]:
    return [part.strip() for part in text.split(separator) if part.strip()]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or TOML file (same keys as :class:`BenchConfig`)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"config file {str(path)!r} not found")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - any parse error becomes a clear message
        raise InputError(f"cannot parse config file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {str(path)!r} must hold a mapping of settings")
    allowed = {f.name for f in fields(BenchConfig)}
    unknown = set(data) - allowed
    if unknown:
        raise InputError(
            f"config file {str(path)!r}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    if isinstance(data.get("lengths"), list):
        data["lengths"] = [parse_length(str(v)) for v in data["lengths"]]
    if isinstance(data.get("recipes"), str):
        data["recipes"] = split_list(data["recipes"], ";")
    return data
