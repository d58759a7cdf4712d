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

    def end_context(self, q: Tensor, ctx: LayerContext) -> None:
        """Called in every layer at the end of the context prefill, after compression and
        conversion, with the forward's last queries ``q`` ``[b, Hq, t, d]``: build an index over
        the context (ShadowKV's low-rank keys, A2ATS's codes). By default nothing."""

    def attend_appended(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Attention ``[b, Hq, t, d]`` of prompt tokens appended after the context (a session's
        question), or None for dense attention over the layer's storage. A method whose index
        moved context entries out of the storage (ShadowKV, A2ATS) attends over them here."""
        return None

    @abstractmethod
    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Attention ``[b, Hq, 1, d]`` over the entries selected for the unrotated query
        ``q`` ``[b, Hq, 1, d]``, or None to attend densely."""
