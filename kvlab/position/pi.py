"""Position Interpolation (PI): every RoPE frequency divided by the extension factor.

Chen et al., "Extending Context Window of Large Language Models via Positional Interpolation",
2023, arXiv:2306.15595. Positions are scaled down by ``s`` (``inv_freq / s``), so a sequence of
``s x L0`` tokens rotates no farther than the trained ``L0``. Training-free PI loses some
quality (the paper fine-tunes briefly); it is the classic baseline. Drop-in: kvlab hands the
parameters to transformers' ``linear`` rope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvlab.position.base import PositionMethod
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class PositionInterpolation(PositionMethod):
    name: ClassVar[str] = "pi"
    paper: ClassVar[str] = "Chen et al., Position Interpolation, 2023, arXiv:2306.15595"
    summary: ClassVar[str] = "Linear interpolation: every RoPE frequency divided by the factor."

    factor: float = param(4.0, "scale factor s (window = s x trained length)", min=1.0, max=64.0)

    def rope_parameters(self, config: Any) -> dict[str, Any]:
        return {"rope_type": "linear", "factor": self.factor}

    def context_window(self, trained: int) -> int:
        return int(trained * self.factor)
