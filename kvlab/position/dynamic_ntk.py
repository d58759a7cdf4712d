"""Dynamic NTK-aware RoPE scaling.

bloc97 / emozilla (2023), "Dynamically Scaled RoPE further increases performance of long
context LLaMA without any fine-tuning" (the method transformers ships as ``rope_type=dynamic``).
The RoPE base grows with the current length L beyond the trained length L0:
``base' = base * (s L / L0 - (s - 1)) ** (d / (d - 2))``; below L0 nothing changes.

With ``rerotate_cache`` (default) keys are kept before RoPE and rotated with the current base
at every step, so queries and keys always agree; this fixes the known inconsistency of
rotating cached keys once with an older base (transformers issue #25104), which
``rerotate_cache=false`` reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvlab.position.base import PositionMethod
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class DynamicNTK(PositionMethod):
    name: ClassVar[str] = "dynamic_ntk"
    paper: ClassVar[str] = "emozilla, Dynamically Scaled RoPE (2023); transformers rope_type=dynamic"
    summary: ClassVar[str] = "RoPE base grown with the current length past the trained length."

    factor: float = param(4.0, "scale factor s (window = s x trained length)", min=1.0, max=64.0)
    rerotate_cache: bool = param(True, "keep keys pre-RoPE and rotate them with the current base")

    @property
    def stores_pre_rope(self) -> bool:
        return self.rerotate_cache

    def frequency_key(self, seq_len: int, trained: int) -> int | None:
        return max(seq_len, trained)  # the base only moves past the trained length

    def rope_parameters(self, config: Any) -> dict[str, Any]:
        return {"rope_type": "dynamic", "factor": self.factor}

    def context_window(self, trained: int) -> int:
        return int(trained * self.factor)
