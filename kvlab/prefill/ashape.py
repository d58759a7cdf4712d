"""A-shape sparse prefill: attention sinks plus a local window.

The static "A-shape" pattern of MInference (Jiang et al., "MInference 1.0: Accelerating
Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024,
arXiv:2407.02490), evaluated as a prefill method by SCBench (arXiv:2412.10319); the pattern is
StreamingLLM's (Xiao et al., arXiv:2309.17453). Query i attends to keys ``j < sink`` and
``i - window < j <= i``. Queries are processed in blocks, each over only its sinks and window,
so work and memory grow as ``n * (sink + window)``: no ``n x n`` score matrix exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.prefill.base import PrefillMethod
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class AShape(PrefillMethod):
    name: ClassVar[str] = "ashape"
    paper: ClassVar[str] = "MInference (Jiang et al., NeurIPS 2024), arXiv:2407.02490; SCBench"
    summary: ClassVar[str] = "Sparse prefill: sink tokens plus a local window per query."

    sink: int = param(128, "initial tokens every query attends to", min=0)
    window: int = param(1024, "local window of preceding tokens (the query included)", min=1)
    block: int = param(256, "queries computed together", min=1)

    def key_indices(self, first: int, last: int) -> Tensor:
        """Positions of the keys that queries ``first..last`` may attend to."""
        lo = max(0, first - self.window + 1)
        sinks = torch.arange(min(self.sink, lo))
        return torch.cat([sinks, torch.arange(lo, last + 1)])

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor:
        layer, q_pos = ctx.layer, ctx.positions
        outputs = []
        for start in range(0, q.shape[2], self.block):
            block_pos = q_pos[start : start + self.block]
            index = self.key_indices(int(block_pos[0]), int(block_pos[-1])).to(q.device)
            allowed = (block_pos[:, None] - index[None, :] < self.window) | (index[None, :] < self.sink)
            outputs.append(
                ctx.attend(
                    q[:, :, start : start + self.block],
                    block_pos,
                    layer.keys.index_select(-2, index),
                    index,
                    layer.values.index_select(-2, index),
                    allowed,
                )
            )
        return torch.cat(outputs, dim=2)
