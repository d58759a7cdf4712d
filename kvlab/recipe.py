"""Recipes: at most one method per stage, written ``yarn(factor=4) + snapkv(budget=256)``.

The string is parsed with Python's own expression parser (a recipe is a sum of calls), so
quoting, numbers and booleans behave as a Python user expects; bare words are strings
(``windowkv(strategy=max)``). ``full`` (or an empty string) is the baseline: no method at all.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, fields
from typing import Any

from kvlab.compress.base import CompressMethod
from kvlab.errors import RecipeError
from kvlab.position.base import PositionMethod
from kvlab.prefill.base import PrefillMethod
from kvlab.quantize.base import QuantizeMethod
from kvlab.registry import STAGES, Method, method_class
from kvlab.retrieve.base import RetrieveMethod
from kvlab.reuse.base import ReuseMethod

MAX_RECIPE_CHARS = 2000
"""Longest recipe string accepted (a recipe holds at most one method per stage)."""
MAX_TERMS = len(STAGES)
_STAGE_TYPES: dict[str, type[Method]] = {
    "position": PositionMethod, "prefill": PrefillMethod, "compress": CompressMethod,
    "quantize": QuantizeMethod, "retrieve": RetrieveMethod, "reuse": ReuseMethod,
}


@dataclass(frozen=True)
class Recipe:
    """One method per stage, or ``None`` for the stage's default (RoPE as trained, dense
    prefill, no compression, dense decoding, no joined documents). Built valid or not at all: each field holds a
    method of its own stage, and the methods must work together (:func:`check_compatible`)."""

    position: PositionMethod | None = None
    prefill: PrefillMethod | None = None
    compress: CompressMethod | None = None
    quantize: QuantizeMethod | None = None
    retrieve: RetrieveMethod | None = None
    reuse: ReuseMethod | None = None

    def __post_init__(self) -> None:
        for stage, expected in _STAGE_TYPES.items():
            method = getattr(self, stage)
            if method is not None and not isinstance(method, expected):
                got = getattr(method, "name", None) or type(method).__name__
                where = getattr(method, "stage", None)
                raise RecipeError(
                    f"Recipe({stage}={got!r}): the {stage} stage takes a {stage} method"
                    + (f", and {got} is a {where} method" if isinstance(where, str) else "")
                )
        check_compatible(self)

    @classmethod
    def parse(cls, text: str | Recipe | None) -> Recipe:
        """The recipe written ``text`` (see :func:`parse_recipe`)."""
        return parse_recipe(text)

    @property
    def methods(self) -> list[Method]:
        stages = (self.position, self.prefill, self.compress, self.quantize, self.retrieve, self.reuse)
        return [m for m in stages if m]

    def __str__(self) -> str:
        return " + ".join(str(m) for m in self.methods) or "full"

    @property
    def batches_decode(self) -> bool:
        """Whether this recipe's decoding steps may share a forward with other sequences'
        (every method says so: :attr:`Method.batches_decode`)."""
        return all(m.batches_decode for m in self.methods)


def parse_recipe(text: str | Recipe | None) -> Recipe:
    """Parse a recipe string; errors name the bad part and list the allowed values. A
    :class:`Recipe` is returned as it is (it is valid by construction)."""
    if isinstance(text, Recipe):
        return text
    if text is not None and not isinstance(text, str):
        raise RecipeError(
            f"recipe={text!r}: a recipe is a string such as 'snapkv(budget=0.25)' (or 'full'), "
            "or a kvlab.Recipe"
        )
    if text is None or not text.strip() or text.strip() == "full":
        return Recipe()
    source = text.strip()
    if source.count("+") >= MAX_TERMS:
        raise RecipeError(
            f"recipe {_short(source)!r} has {source.count('+') + 1} terms; a recipe holds at most "
            f"{MAX_TERMS} methods, one per stage ({', '.join(STAGES)})"
        )
    if len(source) > MAX_RECIPE_CHARS:
        raise RecipeError(
            f"recipe of {len(source)} characters: at most {MAX_RECIPE_CHARS} (one method per "
            f"stage: {', '.join(STAGES)})"
        )
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise RecipeError(
            f"cannot parse recipe {source!r}: {exc.msg}; write methods as name(key=value, ...) "
            "joined by '+', e.g. 'yarn(factor=4) + snapkv(budget=0.25)'"
        ) from None
    terms = _terms(tree.body, source)
    chosen: dict[str, Method] = {}
    for term in terms:
        method = _build(term, source)
        if method.stage in chosen:
            raise RecipeError(
                f"recipe {source!r} has two {method.stage} methods "
                f"({chosen[method.stage].name} and {method.name}); use at most one per stage"
            )
        chosen[method.stage] = method
    return Recipe(**chosen)  # type: ignore[arg-type]


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rotated_alternative(position: PositionMethod) -> str:
    """What to use instead of a position method that keeps keys before RoPE."""
    if any(f.name == "rerotate_cache" for f in fields(position)):
        return f"{position.name}(rerotate_cache=false) or another drop-in position method (e.g. yarn)"
    return "a drop-in position method (e.g. yarn, pi, llama3)"


def _prefill_alternatives() -> str:
    """The registered prefill methods that attend through the position method."""
    from kvlab.registry import methods

    names = [m.name for m in methods() if m.stage == "prefill" and not method_class(m.name).plain_rope_kernel]
    return ", ".join(names)


def check_compatible(recipe: Recipe) -> None:
    """Refuse combinations whose methods cannot work together (they need different key
    storage or attention, or both choose the kept entries): a :class:`RecipeError` ``"a + b is
    not supported: why; what to use instead"``. Every other combination of methods runs
    (``tests/test_composition.py`` runs every pair of methods of two stages)."""
    position, prefill, compress = recipe.position, recipe.prefill, recipe.compress
    quantize, retrieve = recipe.quantize, recipe.retrieve
    if position is not None and retrieve is not None:
        if position.stores_pre_rope and retrieve.needs_rotated_keys:
            raise _unsupported(
                position, retrieve,
                f"{retrieve.name} scores post-RoPE keys, but {position.name} keeps keys before RoPE",
                f"choose {_rotated_alternative(position)} with {retrieve.name}",
            )
    if position is not None and prefill is not None and position.own_attention and prefill.plain_rope_kernel:
        raise _unsupported(
            position, prefill,
            f"{prefill.name} attends with its block-sparse kernel over keys at plain RoPE "
            f"positions, but {position.name} gives each (query, key) pair positions of its own",
            f"use {prefill.name} with a drop-in position method (e.g. yarn), or {position.name} "
            f"with a prefill method that attends through it ({_prefill_alternatives()})",
        )
    if prefill is not None and compress is not None and prefill.selects_kv:
        raise _unsupported(
            prefill, compress,
            f"{prefill.name} chooses the kept KV entries itself (its budget parameter), and so "
            f"does {compress.name}",
            f"use {prefill.name} without a compress method, or {compress.name} with another "
            "prefill method",
        )
    if compress is not None and compress.ragged_heads:
        for other in (quantize, retrieve):
            if other is not None:
                raise _unsupported(
                    compress, other,
                    f"{compress.name} keeps a different number of entries per KV head (each head "
                    f"stored apart), and {other.name} works on one [batch, kv_heads, entries, "
                    "head_dim] tensor per layer",
                    f"use {compress.name} without a {other.stage} method, or {other.name} with a "
                    "compress method that keeps the same entries in every head (e.g. snapkv)",
                )
    reuse = recipe.reuse
    if reuse is not None:
        for other in (prefill, compress, quantize, retrieve):
            if other is not None:
                raise _unsupported(
                    other, reuse,
                    f"{reuse.name} joins documents encoded apart into one cache of plain entries and "
                    f"computes the question's attention over them itself, and {other.name} changes "
                    f"the {other.stage} stage's entries or attention",
                    f"use {reuse.name} alone or with a drop-in position method (e.g. yarn)",
                )
        if position is not None and position.stores_pre_rope:
            raise _unsupported(
                position, reuse,
                f"{reuse.name} stores each document's keys rotated once at its own positions, but "
                f"{position.name} keeps keys before RoPE",
                f"choose {_rotated_alternative(position)} with {reuse.name}",
            )
    if position is not None and quantize is not None:
        if position.stores_pre_rope and quantize.needs_rotated_keys:
            raise _unsupported(
                position, quantize,
                f"{quantize.name} selects channels of post-RoPE keys, but {position.name} keeps "
                "keys before RoPE (pruning unrotated channels is a different selection)",
                f"choose {_rotated_alternative(position)} with {quantize.name}",
            )


def _unsupported(first: Method, second: Method, why: str, instead: str) -> RecipeError:
    """The refusal of two methods (in lifecycle order) that do not combine."""
    return RecipeError(f"{first.name} + {second.name} is not supported: {why}; {instead}")


def _terms(node: ast.expr, source: str) -> list[ast.expr]:
    """The terms of a sum ``a + b + c``, left to right (iteratively: no recursion limit)."""
    terms: list[ast.expr] = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        terms.append(node.right)
        node = node.left
    terms.append(node)
    return terms[::-1]


def _build(term: ast.expr, source: str) -> Method:
    text = ast.get_source_segment(source, term) or source
    if isinstance(term, ast.Name):
        name, keywords = term.id, []
    elif isinstance(term, ast.Call) and isinstance(term.func, ast.Name):
        name, keywords = term.func.id, term.keywords
        if term.args:
            raise RecipeError(f"in {text!r}: give parameters by name, e.g. {name}(budget=256)")
    else:
        raise RecipeError(
            f"in recipe {source!r}: {text!r} is not a method; write name(key=value, ...) terms "
            "joined by '+'"
        )
    if name == "full":
        raise RecipeError("'full' is the baseline and cannot be combined with other methods")
    cls = method_class(name)
    allowed = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for kw in keywords:
        if kw.arg in kwargs:
            raise RecipeError(f"in {text!r}: parameter {kw.arg!r} is given twice; give it once")
        if kw.arg is None or kw.arg not in allowed:
            raise RecipeError(
                f"{name} has no parameter {kw.arg!r}; its parameters: {', '.join(allowed) or 'none'}"
            )
        kwargs[kw.arg] = _literal(kw.value, source, f"{name}({kw.arg}=...)")
    return cls(**kwargs)


def _literal(node: ast.expr, source: str, where: str) -> Any:
    if isinstance(node, ast.Name):
        lowered = node.id.lower()
        return {"true": True, "false": False}.get(lowered, node.id)
    try:
        return ast.literal_eval(node)
    except ValueError:
        text = ast.get_source_segment(source, node)
        raise RecipeError(f"{where}: {text!r} is not a number, boolean or word") from None


__all__ = ["Recipe", "check_compatible", "parse_recipe", "STAGES"]
