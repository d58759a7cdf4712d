"""LongRoPE: a rescale factor per RoPE dimension pair, found offline by evolutionary search.

Ding et al., "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens", ICML 2024,
arXiv:2402.13753. Pair ``i`` rotates at ``1 / (lambda_i * base ** (2i / d))``: ``short_factor``
for sequences up to the trained length ``L0``, ``long_factor`` beyond it; cos and sin are
scaled by ``sqrt(1 + ln s / ln L0)``. The factors are read from the model's config (Phi-3
style ``rope_parameters``) or given as lists of ``d / 2`` numbers in the recipe
(``longrope(long_factor=[1.0, 1.2, ...])``); a missing ``short_factor`` is all ones (RoPE as
trained inside the window). Drop-in: kvlab hands them to transformers' ``longrope`` rope.

The factors switch when the sequence passes ``L0``; with ``rerotate_cache`` (default) keys are
kept before RoPE and rotated with the current factors at every step, so every key agrees with
the queries (rotating cached keys once with the short factors, as transformers' cache does,
is what ``rerotate_cache=false`` reproduces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvlab.engine.rotary import head_dim
from kvlab.errors import RecipeError
from kvlab.position.base import PositionMethod
from kvlab.registry import param, register


def _factors(value: Any, field: str) -> tuple[float, ...]:
    """``value`` (a list or tuple of positive numbers) as a tuple of floats, else RecipeError."""
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value
    ):
        raise RecipeError(
            f"longrope({field}={value!r}): must be a list of positive numbers, one per RoPE "
            "dimension pair (head_dim / 2 of them), or [] to read it from the model's config"
        )
    return tuple(float(x) for x in value)


@register
@dataclass(frozen=True)
class LongRope(PositionMethod):
    name: ClassVar[str] = "longrope"
    paper: ClassVar[str] = "Ding et al., LongRoPE, ICML 2024, arXiv:2402.13753"
    summary: ClassVar[str] = "Per-pair searched rescale factors (short / long), from the config or given."

    factor: float = param(4.0, "scale factor s (window = s x trained length; attention factor)", min=1.0, max=64.0)
    long_factor: tuple[float, ...] = param((), "rescale factor per dimension pair past L0 ([]: the model's config)")
    short_factor: tuple[float, ...] = param((), "rescale factor per dimension pair up to L0 ([]: config, else ones)")
    rerotate_cache: bool = param(True, "keep keys pre-RoPE and rotate them with the current factors")

    def __post_init__(self) -> None:
        object.__setattr__(self, "long_factor", _factors(self.long_factor, "long_factor"))
        object.__setattr__(self, "short_factor", _factors(self.short_factor, "short_factor"))
        super().__post_init__()

    @property
    def stores_pre_rope(self) -> bool:
        return self.rerotate_cache

    def frequency_key(self, seq_len: int, trained: int) -> int | None:
        return int(seq_len > trained)  # short factors up to L0, long ones beyond

    def factors(self, config: Any) -> tuple[list[float], list[float]]:
        """``(long, short)`` factors, ``d / 2`` each: given, else the config's."""
        own = config.rope_parameters or {}
        long = list(self.long_factor) or list(own.get("long_factor") or [])
        short = list(self.short_factor) or list(own.get("short_factor") or [])
        pairs = head_dim(config) // 2
        if not long:
            raise RecipeError(
                "longrope(long_factor=[]): the model's config has no LongRoPE factors; give "
                f"long_factor=[...] ({pairs} numbers, one per RoPE dimension pair)"
            )
        short = short or [1.0] * pairs
        for field, values in (("long_factor", long), ("short_factor", short)):
            if len(values) != pairs:
                raise RecipeError(
                    f"longrope({field}=[{len(values)} numbers]): this model needs {pairs} "
                    f"(head_dim {2 * pairs} / 2), one per RoPE dimension pair"
                )
        return long, short

    def rope_parameters(self, config: Any) -> dict[str, Any]:
        long, short = self.factors(config)
        return {
            "rope_type": "longrope",
            "factor": self.factor,
            "long_factor": long,
            "short_factor": short,
            "original_max_position_embeddings": (config.rope_parameters or {}).get(
                "original_max_position_embeddings", config.max_position_embeddings
            ),
        }

    def context_window(self, trained: int) -> int:
        return int(trained * self.factor)
