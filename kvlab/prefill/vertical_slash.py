"""Vertical-slash sparse prefill (MInference's dynamic pattern).

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention", NeurIPS 2024, arXiv:2407.02490. Per head, the attention of the forward's
last ``last_q`` queries, ``softmax(q[-last_q:] K^T / sqrt(d))`` with its causal tail (a
``last_q x n`` estimate, never ``n x n``), scores every key column (vertical: column sums) and
every diagonal (slash: sums along ``i - j = offset``). The first 30 columns and the 100 nearest
diagonals are forced in (the paper's constants, parameters here so that a short prompt can
show the pattern); the top ``vertical_size`` columns and top ``slash_size`` diagonals are
kept. As in the paper's kernel (its ``convert_vertical_slash_indexes``), the diagonals become
``block x block`` tiles and the columns stay columns: a query block attends to every key block
a kept diagonal crosses, and to each kept column at or before its queries that those blocks do
not hold, gathered one by one, so a column costs one key, not a tile
(:func:`kvlab.prefill.blocks.block_sparse_attention`). The last ``last_q`` query rows attend
densely.

The defaults (1,000 columns, 6,096 diagonals) are the paper's for contexts of 128k tokens and
more; at 16k they keep most of the causal pairs (the share is measured:
``Stats.attended_pairs_per_layer``, benchmarks/README.md "Time vs length").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.engine.kernels import masked_logits
from kvlab.errors import RecipeError
from kvlab.prefill.base import PrefillMethod
from kvlab.prefill.blocks import (
    block_sparse_attention, causal_blocks, dense_tail, query_block_bounds, rotated, supported,
)
from kvlab.registry import param, register

@register
@dataclass(frozen=True)
class VerticalSlash(PrefillMethod):
    name: ClassVar[str] = "vertical_slash"
    paper: ClassVar[str] = "MInference (Jiang et al., NeurIPS 2024), arXiv:2407.02490"
    summary: ClassVar[str] = "Sparse prefill: top key columns and diagonals estimated from the last queries."
    plain_rope_kernel: ClassVar[bool] = True

    vertical_size: int = param(1000, "key columns kept per head (forced_columns included)", min=1)
    slash_size: int = param(6096, "diagonals kept per head (forced_diagonals included)", min=1)
    forced_columns: int = param(30, "first keys always kept as vertical lines (paper: 30)", min=0)
    forced_diagonals: int = param(100, "nearest diagonals always kept (paper: 100)", min=1)
    last_q: int = param(64, "last queries that estimate the pattern (and attend densely)", min=1, max=4096)
    block: int = param(64, "tile size of the block-sparse kernel", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vertical_size < self.forced_columns or self.slash_size < self.forced_diagonals:
            raise RecipeError(
                f"vertical_slash: vertical_size={self.vertical_size} must be >= forced_columns="
                f"{self.forced_columns} and slash_size={self.slash_size} >= forced_diagonals="
                f"{self.forced_diagonals}"
            )

    def estimate(self, q: Tensor, keys: Tensor, q_pos: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        """Kept key columns ``[b, Hq, V]`` and diagonal offsets ``[b, Hq, S]`` from rotated
        queries ``[b, Hq, t, d]`` and keys ``[b, Hk, n, d]`` (key index = position)."""
        n = keys.shape[2]
        tail_pos = q_pos[-self.last_q :]
        logits = masked_logits(q[:, :, -self.last_q :].contiguous(), keys, scaling, None)
        k_pos = torch.arange(n, device=q.device)
        causal = k_pos[None, :] <= tail_pos[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        vertical = probs.sum(-2)
        vertical[..., :self.forced_columns] = float("inf")
        offsets = (tail_pos[:, None] - k_pos[None, :]).clamp(min=0)  # masked entries add 0
        slash = torch.zeros(*probs.shape[:2], n, device=q.device).scatter_add_(
            -1, offsets.expand_as(probs).flatten(-2), probs.flatten(-2)
        )
        slash[..., :self.forced_diagonals] = float("inf")
        columns = vertical.topk(min(self.vertical_size, n), -1).indices
        diagonals = slash.topk(min(self.slash_size, n), -1).indices
        return columns, diagonals

    def block_mask(self, diagonals: Tensor, q_pos: Tensor, n: int) -> Tensor:
        """``[b, Hq, query_blocks, key_blocks]``: the tiles a kept diagonal crosses."""
        bs = self.block
        starts, ends = query_block_bounds(q_pos, bs)
        nkb = -(-n // bs)
        b, h = diagonals.shape[:2]
        mask = torch.zeros(b, h, starts.numel(), nkb + 1, dtype=torch.bool, device=q_pos.device)
        o = diagonals[:, :, None, :]
        hi = ends[None, None, :, None] - o
        lo = (starts[None, None, :, None] - o).clamp(min=0)
        crosses = hi >= 0
        mask.scatter_(-1, torch.where(crosses, lo // bs, nkb), True)
        mask.scatter_(-1, torch.where(crosses, hi.clamp(min=0) // bs, nkb), True)
        return mask[..., :nkb] & causal_blocks(q_pos, n, bs)

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        if not supported(ctx):
            return None
        q_rot, keys, values = rotated(q, ctx)
        n = keys.shape[2]
        columns, diagonals = self.estimate(q_rot, keys, ctx.positions, ctx.scaling)

        def sparse(head: Tensor, sub: LayerContext) -> Tensor:
            cut = head.shape[2]
            tiles = self.block_mask(diagonals, ctx.positions, n)  # whole tiles
            mask = tiles[:, :, : -(-cut // self.block)]
            return block_sparse_attention(
                q_rot[:, :, :cut], keys, values, sub.positions, mask, ctx.scaling, self.block,
                count=ctx.count_pairs, columns=columns,
            ).to(q.dtype)

        return dense_tail(q, ctx, self.last_q, sparse)
