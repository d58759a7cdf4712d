"""StreamingLLM: keep the attention sinks and the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv:2309.17453. The first ``sink`` tokens (4 in the paper) absorb attention mass that must go
somewhere; with them and a recent window the model stays stable. kvlab applies the eviction
when the prompt has been prefilled; kept entries keep their original positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.compress.base import CompressMethod, sinks_and_recent
from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register, resolve_budget


@register
@dataclass(frozen=True)
class StreamingLLM(CompressMethod):
    name: ClassVar[str] = "streaming_llm"
    paper: ClassVar[str] = "Xiao et al., StreamingLLM, ICLR 2024, arXiv:2309.17453"
    summary: ClassVar[str] = "Keep the first sink tokens and the most recent ones."

    budget: Budget = param(2048, "entries kept per layer and head (sinks included)")
    sink: int = param(4, "initial tokens always kept (attention sinks)", min=0)

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        n = ctx.layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        sink = min(self.sink, budget)
        return sinks_and_recent(n, sink, budget - sink, q.device)
