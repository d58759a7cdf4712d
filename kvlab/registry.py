"""The method registry: every method is a small dataclass registered under its stage.

A method declares its hyper-parameters as dataclass fields made with :func:`param` (default,
help text, allowed range) and registers itself with :func:`register`. The registry validates
parameters the same way for every method, so a method's class only says what is specific to it.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from kvlab.errors import RecipeError

Stage = Literal["position", "prefill", "compress", "quantize", "retrieve", "reuse"]
STAGES: tuple[Stage, ...] = ("position", "prefill", "compress", "quantize", "retrieve", "reuse")
"""Lifecycle order. ``quantize`` is the compress stage's second half (smaller entries, where
``compress`` keeps fewer): it owns the storage format, so it combines with any eviction.
``reuse`` methods act on caches encoded apart and joined (APE's documents)."""

Budget = Union[int, float]
"""A KV budget: an integer token count (>= 1) or a float fraction of the context in (0, 1]."""
MAX_BUDGET_TOKENS = 1 << 24
"""Largest token budget accepted (16,777,216 tokens: beyond any context a model here holds)."""
BUILTIN_PACKAGES = tuple(f"kvlab.{stage}" for stage in STAGES)
"""Where kvlab's own methods live; imported (registering them) the first time the registry is
read, so ``import kvlab`` stays light and a recipe parses however kvlab was imported."""


def resolve_budget(budget: Budget, context_tokens: int) -> int:
    """Turn a budget into a token count for a context of ``context_tokens`` tokens.

    A float is a fraction of the context (rounded, at least 1 token); an int is a token count.
    """
    if isinstance(budget, float):
        return max(1, round(budget * context_tokens))
    return int(budget)


def param(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A method hyper-parameter: a dataclass field with its help text and allowed range."""
    return dataclasses.field(
        default=default, metadata={"help": help, "min": min, "max": max, "choices": choices}
    )


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a registered method, as `kvlab methods` lists it."""

    name: str
    type: str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, stage, parameters and paper."""

    name: str
    stage: str
    summary: str
    paper: str
    params: tuple[ParamInfo, ...]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Method:
    """Base of every method. Subclasses are frozen dataclasses registered with :func:`register`."""

    stage: ClassVar[Stage]
    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    sliding_window_refusal: ClassVar[str | None] = None
    """Why the method cannot run on a model with sliding-window (local) layers, such as
    Gemma-3, followed by what to use instead; None: it acts on the model's global layers
    only (the local layers keep their window, RoPE as trained, dense attention)."""

    batches_decode: ClassVar[bool] = True
    """Whether a decoding step of a sequence using this method may run in one model forward
    with other sequences' steps (each still attends over its own cache, with its own recipe:
    :class:`kvlab.engine.forward.BatchForward`). False for a method whose decoding step needs
    the forward to itself."""

    def __post_init__(self) -> None:
        validate_params(self)

    def __str__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.name}({args})"

    def prepare(self, engine: Any) -> Any:
        """Work done once per model before the method runs (e.g. DuoAttention's head
        identification); the result reaches the method as ``ctx.prepared[stage]``. None: nothing
        to prepare."""
        return None


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method class to the registry under ``cls.name``."""
    if cls.stage not in STAGES:
        raise TypeError(f"{cls.__name__}.stage={cls.stage!r} is not one of {STAGES}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def load_builtin_methods() -> None:
    """Import kvlab's stage packages, whose modules register the built-in methods (a plug-in
    discovery at call time, not a dependency of this module: imports still run one way)."""
    for package in BUILTIN_PACKAGES:
        importlib.import_module(package)


def method_class(name: str) -> type[Method]:
    """The registered class called ``name``; a :class:`RecipeError` lists the known names."""
    load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(["full", *sorted(_REGISTRY)])
        raise RecipeError(f"unknown method {name!r}; known methods: {known}") from None


def methods() -> list[MethodInfo]:
    """Every registered method, ordered by stage then name, with its parameters and paper."""
    load_builtin_methods()
    infos = [
        MethodInfo(
            name="full",
            stage="baseline",
            summary="Dense attention over the full KV cache (no method).",
            paper="-",
            params=(),
        )
    ]
    for cls in sorted(_REGISTRY.values(), key=lambda c: (STAGES.index(c.stage), c.name)):
        infos.append(
            MethodInfo(
                name=cls.name,
                stage=cls.stage,
                summary=cls.summary,
                paper=cls.paper,
                params=tuple(_param_info(cls, f) for f in dataclasses.fields(cls)),
            )
        )
    return infos


def _param_info(cls: type, f: dataclasses.Field) -> ParamInfo:
    hint = typing.get_type_hints(cls)[f.name]
    return ParamInfo(
        name=f.name,
        type=_type_name(hint),
        default=f.default,
        help=f.metadata.get("help", ""),
        min=f.metadata.get("min"),
        max=f.metadata.get("max"),
        choices=f.metadata.get("choices"),
    )


def _type_name(hint: Any) -> str:
    if hint == Budget:
        return "budget"
    if get_origin(hint) is Literal:
        return "|".join(str(a) for a in get_args(hint))
    return getattr(hint, "__name__", str(hint))


def validate_params(method: Method) -> None:
    """Check every field of ``method`` against its type and range; raise :class:`RecipeError`."""
    hints = typing.get_type_hints(type(method))
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        where = f"{method.name}({f.name}={value!r})"
        hint = hints[f.name]
        meta = f.metadata
        if hint == Budget:
            _check_budget(value, where)
            continue
        if get_origin(hint) is Literal:
            allowed = get_args(hint)
            if value not in allowed:
                raise RecipeError(f"{where}: must be one of {', '.join(map(str, allowed))}")
            continue
        if hint is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: must be true or false")
        elif hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RecipeError(f"{where}: must be an integer")
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{where}: must be a number")
            object.__setattr__(method, f.name, float(value))
            value = float(value)
        elif hint is str and not isinstance(value, str):
            raise RecipeError(f"{where}: must be a string")
        lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
        if choices is not None and value not in choices:
            raise RecipeError(f"{where}: must be one of {', '.join(map(str, choices))}")
        if lo is not None and value < lo:
            raise RecipeError(f"{where}: must be >= {lo}")
        if hi is not None and value > hi:
            raise RecipeError(f"{where}: must be <= {hi}")


def _check_budget(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(
            f"{where}: a budget is a token count (integer >= 1) or a fraction in (0, 1]"
        )
    if isinstance(value, int) and not 1 <= value <= MAX_BUDGET_TOKENS:
        raise RecipeError(f"{where}: a token budget must be >= 1 and <= {MAX_BUDGET_TOKENS}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise RecipeError(f"{where}: a fractional budget must be in (0, 1]")
