"""Llama-3.1 RoPE scaling: keep high frequencies, interpolate low ones, blend the band between.

Meta AI, "The Llama 3 Herd of Models", 2024, arXiv:2407.21783 (the ``llama3`` rope of
Llama-3.1). A pair of wavelength ``lambda = 2 pi / theta`` shorter than
``L0 / high_freq_factor`` is kept; one longer than ``L0 / low_freq_factor`` is divided by
``factor``; between, ``sigma = (L0 / lambda - low) / (high - low)`` blends
``(1 - sigma) theta / factor + sigma theta``. Drop-in: kvlab hands the parameters to
transformers' ``llama3`` rope, with ``L0`` the model's trained length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvlab.errors import RecipeError
from kvlab.position.base import PositionMethod
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class Llama3(PositionMethod):
    name: ClassVar[str] = "llama3"
    paper: ClassVar[str] = "Meta AI, The Llama 3 Herd of Models, 2024, arXiv:2407.21783"
    summary: ClassVar[str] = "Llama-3.1 scaling: high frequencies kept, low ones divided, smooth band."

    factor: float = param(8.0, "scale factor s (window = s x trained length)", min=1.0, max=64.0)
    low_freq_factor: float = param(1.0, "wavelengths above L0 / low_freq_factor are divided by s", min=0.0)
    high_freq_factor: float = param(4.0, "wavelengths below L0 / high_freq_factor are kept", min=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise RecipeError(
                f"llama3(low_freq_factor={self.low_freq_factor}, high_freq_factor="
                f"{self.high_freq_factor}): need 0 < low_freq_factor < high_freq_factor"
            )

    def rope_parameters(self, config: Any) -> dict[str, Any]:
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": config.max_position_embeddings,
        }

    def context_window(self, trained: int) -> int:
        return int(trained * self.factor)
