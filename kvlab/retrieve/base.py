"""The retrieve stage: the cache is kept whole, each decoding step reads a subset of it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.registry import Method


@dataclass(frozen=True)
class RetrieveMethod(Method, ABC):
    """Base of retrieve methods, asked at every decoding step (one query token)."""

    stage: ClassVar[str] = "retrieve"
    needs_rotated_keys: ClassVar[bool] = False
    """True when selection scores the stored keys as rotated (post-RoPE) vectors."""

    @abstractmethod
    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Attention ``[b, Hq, 1, d]`` over the entries selected for the unrotated query
        ``q`` ``[b, Hq, 1, d]``, or None to attend densely."""
