"""The prefill stage: how attention is computed while the prompt is encoded."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.registry import Method


@dataclass(frozen=True)
class PrefillMethod(Method, ABC):
    """A sparse prefill pattern. :meth:`attend` is called for prompt forwards on layers that
    still hold every token (nothing evicted); the full KV cache is still stored."""

    stage: ClassVar[str] = "prefill"

    @abstractmethod
    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Attention ``[b, Hq, t, d]`` of the forward's unrotated queries, or None for dense."""
