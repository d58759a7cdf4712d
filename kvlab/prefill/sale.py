"""SALE: low-bit estimation of the attention map, then block-sparse prefill.

Ji, Zhang, Fu, Cui, "SALE: Low-bit Estimation for Efficient Sparse Attention in Long-context
LLM Prefilling", arXiv:2505.24179. Queries and keys (rotated; keys centred by their mean over
the layer's keys, which shifts each query's logits by one constant and so changes no softmax)
are quantised to 4-bit integers per ``block``-token block and head (symmetric, scale
``max|x| / 7``). The estimated logits ``s~`` of a group of query blocks against all keys give
each query-key pair its Relative Attention Score ``exp(s~_ij - max_j s~_ij)`` (its weight
relative to the largest in its row); a key block is computed for a query block when any pair
in the tile scores at least the head's ``threshold``. The estimate is taken a group of query
blocks at a time (``group x block x n`` logits, never ``n x n``); the chosen tiles go through
:func:`kvlab.prefill.blocks.block_sparse_attention`.

Left out: the paper's fused int4 CUDA kernels (here the int4 values are multiplied in fp32,
so the estimate costs a dense pass of matmuls on CPU), and its offline per-head threshold
calibration: one ``threshold`` is given for every head (the kernel accepts a per-head tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.prefill.base import PrefillMethod
from kvlab.prefill.block_sparse import diagonal_blocks
from kvlab.prefill.blocks import (
    block_sparse_attention, causal_blocks, query_block_bounds, rotated, supported,
)
from kvlab.registry import param, register

LEVELS = 7  # symmetric 4-bit: integers in [-7, 7]
ESTIMATE_BUDGET = 1 << 23  # estimated logits per group of query blocks


def quantize_blocks(x: Tensor, block: int) -> Tensor:
    """``x`` ``[b, h, m, d]`` rounded to 4-bit integers per ``block`` rows, then scaled back
    (the values the low-bit product sees)."""
    m = x.shape[2]
    blocks = F.pad(x.float(), (0, 0, 0, -m % block)).unflatten(2, (-1, block))
    scale = blocks.abs().amax((-1, -2), keepdim=True).clamp(min=1e-12) / LEVELS
    return (torch.round(blocks / scale).clamp(-LEVELS, LEVELS) * scale).flatten(2, 3)[:, :, :m]


@register
@dataclass(frozen=True)
class Sale(PrefillMethod):
    name: ClassVar[str] = "sale"
    paper: ClassVar[str] = "SALE (Ji et al., 2025), arXiv:2505.24179"
    summary: ClassVar[str] = "Sparse prefill: 4-bit q.k estimate, tiles above a relative-score threshold."
    plain_rope_kernel: ClassVar[bool] = True

    threshold: float = param(0.004, "Relative Attention Score a tile must reach (0: dense)", min=0.0, max=1.0)
    block: int = param(64, "tokens per query and key block", min=1)

    def block_mask(self, q: Tensor, keys: Tensor, q_pos: Tensor, scaling: float) -> Tensor:
        """``[b, Hq, query_blocks, key_blocks]`` from rotated queries ``[b, Hq, t, d]`` and keys
        ``[b, Hk, n, d]``."""
        bs, n = self.block, keys.shape[2]
        b, h, t, _ = q.shape
        qq = quantize_blocks(q, bs)
        kq = quantize_blocks(keys.float() - keys.float().mean(2, keepdim=True), bs)
        kq = kq.repeat_interleave(h // keys.shape[1], 1)  # the estimate is per query head
        pad = -n % bs
        k_pos = torch.arange(n, device=q.device)
        nqb = -(-t // bs)
        group = max(1, ESTIMATE_BUDGET // (b * h * bs * n))
        masks = []
        for start in range(0, nqb, group):
            rows = slice(start * bs, min(t, (start + group) * bs))
            logits = torch.matmul(qq[:, :, rows], kq.transpose(-1, -2)) * scaling
            causal = k_pos[None, :] <= q_pos[rows, None]
            logits = logits.masked_fill(~causal, float("-inf"))
            relative = torch.exp(logits - logits.amax(-1, keepdim=True))
            relative = F.pad(relative, (0, pad, 0, -relative.shape[2] % bs))
            best = relative.unflatten(-1, (-1, bs)).amax(-1).unflatten(2, (-1, bs)).amax(3)
            masks.append(best >= self.threshold)
        mask = torch.cat(masks, 2) | diagonal_blocks(q_pos, n, bs)
        return mask & causal_blocks(q_pos, n, bs)

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        if not supported(ctx):
            return None
        q_rot, keys, values = rotated(q, ctx)
        mask = self.block_mask(q_rot, keys, ctx.positions, ctx.scaling)
        return block_sparse_attention(q_rot, keys, values, ctx.positions, mask, ctx.scaling, self.block,
                                      count=ctx.count_pairs).to(q.dtype)
