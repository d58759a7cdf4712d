"""Block-sparse prefill (MInference's block-sparse pattern).

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention", NeurIPS 2024, arXiv:2407.02490. Queries and keys are mean-pooled over
``block``-token blocks (rotated, per head); the pooled scores ``[query_blocks, key_blocks]``
(never ``n x n``) pick each query block's ``topk`` causal key blocks. Besides the top-k, every
query block always attends to its diagonal key block(s) (which hold its own keys) and to the
first key block (the attention sinks); this choice is kvlab's. Computed by
:func:`kvlab.prefill.blocks.block_sparse_attention`: work and memory grow as
``n * topk * block``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.prefill.base import PrefillMethod
from kvlab.prefill.blocks import (
    block_sparse_attention, causal_blocks, query_block_bounds, rotated, supported,
)
from kvlab.registry import param, register


def mean_pool(x: Tensor, block: int) -> Tensor:
    """``[b, h, m, d]`` -> ``[b, h, ceil(m / block), d]``: the mean of each block (the last
    block over its own rows only)."""
    m = x.shape[2]
    pad = -m % block
    sums = F.pad(x.float(), (0, 0, 0, pad)).unflatten(2, (-1, block)).sum(3)
    sizes = torch.full((sums.shape[2],), float(block), device=x.device)
    sizes[-1] = block - pad
    return sums / sizes[:, None]


def diagonal_blocks(q_pos: Tensor, n: int, block: int) -> Tensor:
    """``[query_blocks, key_blocks]``: the key blocks holding a query block's own positions."""
    starts, ends = query_block_bounds(q_pos, block)
    kb = torch.arange(-(-n // block), device=q_pos.device)
    return (kb[None, :] >= starts[:, None] // block) & (kb[None, :] <= ends[:, None] // block)


@register
@dataclass(frozen=True)
class BlockSparse(PrefillMethod):
    name: ClassVar[str] = "block_sparse"
    paper: ClassVar[str] = "MInference (Jiang et al., NeurIPS 2024), arXiv:2407.02490"
    summary: ClassVar[str] = "Sparse prefill: top key blocks per query block by mean-pooled q.k."
    plain_rope_kernel: ClassVar[bool] = True

    topk: int = param(100, "key blocks kept per query block (plus its diagonal and the first)", min=1)
    block: int = param(64, "tokens per query and key block", min=1)

    def block_mask(self, q: Tensor, keys: Tensor, q_pos: Tensor) -> Tensor:
        """``[b, Hq, query_blocks, key_blocks]`` from rotated queries ``[b, Hq, t, d]`` and keys
        ``[b, Hk, n, d]``."""
        n = keys.shape[2]
        pooled = mean_pool(keys, self.block).repeat_interleave(q.shape[1] // keys.shape[1], 1)
        scores = mean_pool(q, self.block) @ pooled.transpose(-1, -2)
        causal = causal_blocks(q_pos, n, self.block)
        scores = scores.masked_fill(~causal, float("-inf"))
        top = scores.topk(min(self.topk, scores.shape[-1]), -1)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
        mask |= diagonal_blocks(q_pos, n, self.block)
        mask[..., 0] = True
        return mask & causal

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        if not supported(ctx):
            return None
        q_rot, keys, values = rotated(q, ctx)
        mask = self.block_mask(q_rot, keys, ctx.positions)
        return block_sparse_attention(q_rot, keys, values, ctx.positions, mask, ctx.scaling, self.block,
                                      count=ctx.count_pairs).to(q.dtype)
