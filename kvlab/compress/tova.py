"""TOVA: keep what the last token attends to, one choice per layer.

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024, arXiv:2401.06104 (Token
Omission Via Attention). Once the cache is over its size, the current query's attention
probabilities, averaged over all query heads of the layer, score the entries; the layer keeps
its top ``budget`` entries for every head — one index set per layer, so kvlab stores one shared
position tensor ``[k]`` — and no sinks or recent tokens are forced.

Prefill form: the reference code reduces the cache after any forward, using the attention
row of the forward's last query (``attn_weights[:, :, -1, :].mean(1)``); kvlab does exactly
that at the end of the prompt prefill. The paper's per-step eviction during decoding (one
token out per new token) needs an engine hook at every decoding step; without it the cache
grows by the decoded tokens, as for every kvlab compress method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.compress.base import CompressMethod, shared_or_per_head
from kvlab.compress.decoding import SIZE, CacheSize, all_but, cache_size
from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register, resolve_budget


@register
@dataclass(frozen=True)
class TOVA(CompressMethod):
    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "Oren et al., Transformers are Multi-State RNNs (TOVA), arXiv:2401.06104"
    summary: ClassVar[str] = "Last query's head-averaged attention; one kept set per layer."

    budget: Budget = param(2048, "entries kept per layer, shared by all heads (cache size)")

    def compress(self, q: Tensor, ctx: LayerContext) -> None:
        """Evict at the end of the prefill and remember the cache size for decoding."""
        ctx.layer.side[SIZE] = CacheSize(resolve_budget(self.budget, ctx.layer.num_entries))
        super().compress(q, ctx)

    @property
    def evicts_while_decoding(self) -> bool:
        return True

    def after_decode_step(self, q: Tensor, ctx: LayerContext) -> None:
        """TOVA's per-step form: once over the cache size, drop the entry the current query
        attends to least (head-averaged), one per step."""
        size, n = cache_size(ctx.layer), ctx.layer.num_entries
        if size is None or n <= size:
            return
        probs = torch.softmax(ctx.logits(q, ctx.positions), dim=-1)  # [b, Hq, 1, n]
        drop = probs.mean(dim=1)[:, 0].argmin(dim=-1)  # [b]
        ctx.layer.select(shared_or_per_head(all_but(drop, n), ctx.layer.kv_heads))

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        n = ctx.layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        logits = ctx.logits(q[:, :, -1:], ctx.positions[-1:])  # [b, Hq, 1, n]
        scores = torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]  # [b, n]
        keep = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
        return shared_or_per_head(keep, ctx.layer.kv_heads)
