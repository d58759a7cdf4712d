"""Static NTK-aware RoPE scaling: a larger RoPE base, fixed once.

bloc97, "NTK-Aware Scaled RoPE allows LLaMA models to have extended (8k+) context size without
any fine-tuning and minimal perplexity degradation" (2023), as formalised in the YaRN paper
(Peng et al., ICLR 2024, arXiv:2309.00071, section 3.1):
``base' = base * s ** (d / (d - 2))``. The highest frequency is kept (extrapolated) and the
lowest is divided by exactly ``s`` (interpolated), with a geometric blend between. transformers
has no static key for it, so kvlab sets ``rope_theta`` (drop-in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvlab.engine.rotary import head_dim
from kvlab.position.base import PositionMethod
from kvlab.registry import param, register


def rope_base(config: Any) -> float:
    """The model's RoPE base (``rope_theta``)."""
    params = config.rope_parameters or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


@register
@dataclass(frozen=True)
class StaticNTK(PositionMethod):
    name: ClassVar[str] = "ntk"
    paper: ClassVar[str] = "bloc97, NTK-aware scaled RoPE (2023); YaRN, ICLR 2024, arXiv:2309.00071"
    summary: ClassVar[str] = "NTK-aware scaling: RoPE base raised to base * s^(d/(d-2)), fixed."

    factor: float = param(4.0, "scale factor s (window = s x trained length)", min=1.0, max=64.0)

    def rope_parameters(self, config: Any) -> dict[str, Any]:
        d = head_dim(config)
        return {"rope_type": "default", "rope_theta": rope_base(config) * self.factor ** (d / (d - 2))}

    def context_window(self, trained: int) -> int:
        return int(trained * self.factor)
