"""Dual Chunk Attention (DCA, ChunkLlama): chunked positions, never past the trained range.

An et al., "Training-Free Long-Context Scaling of Large Language Models", ICML 2024,
arXiv:2402.17463. Keys sit at ``j mod c`` within chunks of ``c = chunk_size - local_window``
tokens. A query at ``i`` reads its own chunk at ``i mod c`` (intra-chunk: the normal relative
distance), the previous chunk at ``min(i mod c + c, chunk_size)`` (successive-chunk: keeps
the local window's distances exact) and every older chunk at the constant
``min(2c - 1, chunk_size)`` (inter-chunk, the successive position of the chunk's last row, as
the reference code does). Three exact passes merged by log-sum-exp. Defaults follow the
released code: ``chunk_size = 3 L0 / 4``, ``local_window = L0 / 16``. A sequence shorter than
one chunk is plain attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.rotary import Rotary
from kvlab.errors import RecipeError
from kvlab.position.passes import UNBOUNDED_EXTENSION, MultiPassPosition, Pass, resolve, trained_length
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class DualChunkAttention(MultiPassPosition):
    name: ClassVar[str] = "dca"
    paper: ClassVar[str] = "An et al., Training-Free Long-Context Scaling (DCA), ICML 2024, arXiv:2402.17463"
    summary: ClassVar[str] = "Intra-, successive- and inter-chunk positions, merged by log-sum-exp."

    chunk_size: int = param(0, "chunk size s, the largest position used (0: 3/4 of the trained length)", min=0)
    local_window: int = param(0, "local window w kept exact across chunk borders (0: trained length / 16)", min=0)

    def sizes(self, trained: int) -> tuple[int, int]:
        """``(chunk_size s, chunk length c = s - w)`` on a model of ``trained`` tokens."""
        size = resolve(self.chunk_size, 3 * trained // 4, f"dca(chunk_size={self.chunk_size})")
        window = resolve(self.local_window, trained // 16, f"dca(local_window={self.local_window})")
        if size - window < 1 or size > trained:
            raise RecipeError(
                f"dca(chunk_size={size}, local_window={window}): need local_window < chunk_size "
                f"<= the trained length {trained}"
            )
        return size, size - window

    def passes(self, q_pos: Tensor, k_pos: Tensor, rotary: Rotary, length: int) -> list[Pass]:
        size, c = self.sizes(trained_length(rotary, self.name))
        q_chunk = q_pos[:, None] // c  # [t, 1]
        k_chunk = k_pos[..., None, :] // c  # [n] or [b, H, n] -> [1, n] or [b, H, 1, n]
        causal = k_pos[..., None, :] <= q_pos[:, None]
        keys = k_pos % c
        intra = q_pos % c
        successive = torch.clamp(intra + c, max=size)
        inter = torch.full_like(q_pos, min(2 * c - 1, size))
        return [
            Pass(causal & (k_chunk == q_chunk), intra, keys),
            Pass(causal & (k_chunk == q_chunk - 1), successive, keys),
            Pass(causal & (k_chunk <= q_chunk - 2), inter, keys),
        ]

    def context_window(self, trained: int) -> int:
        return trained * UNBOUNDED_EXTENSION
