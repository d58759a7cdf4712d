"""YaRN: NTK-by-parts interpolation plus attention temperature.

Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models", ICLR 2024,
arXiv:2309.00071. Dimensions that rotate fast (more than ``beta_fast`` turns over the trained
length) keep their frequency, slow ones (fewer than ``beta_slow`` turns) are interpolated by
``factor``, a linear ramp blends the ones between; cos and sin are scaled by
``0.1 ln(factor) + 1``. Drop-in: kvlab hands the parameters to transformers' ``yarn`` rope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvlab.position.base import PositionMethod
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class Yarn(PositionMethod):
    name: ClassVar[str] = "yarn"
    paper: ClassVar[str] = "Peng et al., YaRN, ICLR 2024, arXiv:2309.00071"
    summary: ClassVar[str] = "NTK-by-parts frequency interpolation with attention temperature."

    factor: float = param(4.0, "context extension factor s (window = s x trained length)", min=1.0, max=64.0)
    beta_fast: float = param(32.0, "turns above which a dimension extrapolates (kept)", min=1.0)
    beta_slow: float = param(1.0, "turns below which a dimension is interpolated by s", min=0.0)

    def rope_parameters(self, config: Any) -> dict[str, Any]:
        return {
            "rope_type": "yarn",
            "factor": self.factor,
            "original_max_position_embeddings": config.max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }

    def context_window(self, trained: int) -> int:
        return int(trained * self.factor)
