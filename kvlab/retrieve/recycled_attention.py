"""Recycled Attention: full attention every few steps, its top tokens reused in between.

Xu et al., "Recycled Attention: Efficient inference for long-context language models",
arXiv:2411.05787 (2024). Decoding alternates: every ``stride`` steps (the first decoding step
included) a layer attends over its whole cache and keeps, per KV head, the ``budget`` entries
that step attended to most (attention probabilities summed over the query heads of the KV
head's group, as the paper does for GQA models); the steps in between attend only to those
entries plus the tokens generated since that full step (their own included). The recycled
set is per KV head, the attention exact on it at the entries' original positions.

The per-layer state (chosen entries ``[b, Hkv, k]`` and the entry count at the full step) is a
side index of the layer, counted in its bytes; truncating below the full step or selecting
entries drops it, so the next step is a full one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.engine.kernels import gather_entries
from kvlab.registry import Budget, param, register, resolve_budget
from kvlab.retrieve.base import RetrieveMethod

INDEX_KEY = "recycled_attention.recycled"


class Recycled:
    """The entries ``[b, Hkv, k]`` the last full step of a layer attended to most, and the
    layer's entry count at that step (entries from there on are attended too)."""

    def __init__(self, chosen: Tensor, entries: int) -> None:
        self.chosen = chosen
        self.entries = entries

    @property
    def valid(self) -> bool:
        return self.entries > 0

    def nbytes(self) -> int:
        return self.chosen.numel() * self.chosen.element_size()

    def on_select(self, keep: Tensor) -> None:
        self.entries = 0  # entries renumbered: the next step is a full one

    def truncate(self, num_entries: int) -> None:
        if num_entries < self.entries:
            self.entries = 0


@register
@dataclass(frozen=True)
class RecycledAttention(RetrieveMethod):
    name: ClassVar[str] = "recycled_attention"
    paper: ClassVar[str] = "Xu et al., Recycled Attention, arXiv:2411.05787"
    summary: ClassVar[str] = (
        "Full attention every stride steps; in between its top-k entries per KV head plus new tokens."
    )

    budget: Budget = param(4096, "entries recycled per KV head between full steps (top-k)")
    stride: int = param(10, "decoding steps from one full-attention step to the next", min=1)
    dense_layers: int = param(0, "first layers that stay dense", min=0)

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        layer = ctx.layer
        n = layer.num_entries
        if ctx.index < self.dense_layers:
            return None
        state = layer.side.get(INDEX_KEY)
        if isinstance(state, Recycled) and state.valid and n - state.entries < self.stride:
            return self.recycled_attend(q, ctx, state)
        top = resolve_budget(self.budget, n)
        if top >= n:
            layer.side.pop(INDEX_KEY, None)
            return None
        return self.full_step(q, ctx, top)

    def full_step(self, q: Tensor, ctx: LayerContext, top: int) -> Tensor:
        """Dense attention over the layer; remember its ``top`` most attended entries."""
        layer = ctx.layer
        probs = torch.softmax(ctx.logits(q, ctx.positions), dim=-1)  # [b, Hq, 1, n] fp32
        b, hq, _, n = probs.shape
        kv_heads = layer.kv_heads
        grouped = probs.reshape(b, kv_heads, hq // kv_heads, n)
        chosen = grouped.sum(dim=2).topk(top, dim=-1).indices.sort(dim=-1).values
        layer.side[INDEX_KEY] = Recycled(chosen, n)
        out = torch.matmul(grouped.to(layer.values.dtype), layer.values)
        return out.reshape(b, hq, 1, -1).to(q.dtype)

    def recycled_attend(self, q: Tensor, ctx: LayerContext, state: Recycled) -> Tensor:
        """Attention over the recycled entries plus every entry since the full step (one
        gather per keys and values, into reused buffers)."""
        layer = ctx.layer
        n = layer.num_entries
        b, kv_heads, _ = state.chosen.shape
        since = torch.arange(state.entries, n, device=q.device).expand(b, kv_heads, -1)
        entries = torch.cat([state.chosen, since], dim=-1)  # [b, Hkv, k + new]
        shape = (b, kv_heads, entries.shape[-1], layer.keys.shape[-1])
        keys = gather_entries(layer.keys, entries, out=ctx.buffer("recycled.keys", shape, layer.keys))
        values = gather_entries(layer.values, entries, out=ctx.buffer("recycled.values", shape, layer.values))
        return ctx.attend(q, ctx.positions, keys, layer.entry_positions(entries), values)
