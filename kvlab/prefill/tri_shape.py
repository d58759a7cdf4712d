"""Tri-shape sparse prefill: A-shape plus dense last rows.

SCBench (Li et al., "SCBench: A KV Cache-Centric Analysis of Long-Context Methods",
arXiv:2412.10319): the static A-shape pattern of MInference (arXiv:2407.02490) — sink tokens
plus a local window — with the last ``last`` query rows of the prompt attending densely, which
keeps the query (asked at the end of the prompt) able to read the whole context. The A-shape
rows are :class:`kvlab.prefill.ashape.AShape`'s; the dense rows go through
:func:`kvlab.prefill.blocks.dense_tail`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.prefill.ashape import AShape
from kvlab.prefill.base import PrefillMethod
from kvlab.prefill.blocks import dense_tail
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class TriShape(PrefillMethod):
    name: ClassVar[str] = "tri_shape"
    paper: ClassVar[str] = "SCBench (Li et al., 2024), arXiv:2412.10319; MInference arXiv:2407.02490"
    summary: ClassVar[str] = "Sparse prefill: sinks plus a local window, the last rows dense."

    sink: int = param(128, "initial tokens every query attends to", min=0)
    window: int = param(1024, "local window of preceding tokens (the query included)", min=1)
    last: int = param(100, "last query rows of the forward that attend densely", min=0)
    block: int = param(256, "queries computed together in the A-shape rows", min=1)

    @property
    def ashape(self) -> AShape:
        return AShape(sink=self.sink, window=self.window, block=self.block)

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        return dense_tail(q, ctx, self.last, self.ashape.attend)
