"""H2O: keep the heavy hitters — the entries that gathered the most attention — and the
most recent entries.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv:2306.14048. Each head accumulates, for every entry, the attention
probability every query has given it; the cache keeps the ``budget - recent`` entries with the
largest accumulated score among the older ones, plus the ``recent`` most recent entries
(reference code: ``hh_score`` summed over queries, top ``hh_size`` of
``hh_score[:, :seq_len - recent_size]``, then the last ``recent_size``).

Prefill form and its limits:

- The scores are the column sums of the causal attention of *every query kvlab has at the end
  of the prefill* — the last prefill chunk's queries (the whole prompt when it fits one chunk,
  :attr:`Engine.prefill_chunk`, 1024 by default) — over all entries, computed in blocks of
  queries so the fp32 probabilities stay small. Queries of earlier chunks are gone by then;
  counting them needs an engine hook that lets the compress method observe every prefill chunk.
- Decoding-time eviction (the paper's per-step update) needs a hook at every decoding step;
  without it decoded tokens are appended, as for every kvlab compress method.
- GQA: the query heads of a KV head share its entries, so their scores are summed (the mean
  would rank identically).

Budget defaults follow the paper: a cache of 20% of the context, half heavy hitters and half
recent tokens (heavy 10% + recent 10%). ``recent`` is the *share of the budget* given to the
recent tokens, so ``h2o(budget=0.2, recent=0.5)`` is the paper's setting at any length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.compress.base import CompressMethod, top_k_plus_window
from kvlab.engine.attention import LayerContext
from kvlab.registry import Budget, param, register, resolve_budget

LOGIT_BLOCK = 1 << 24
"""Most fp32 attention probabilities held at once (64 MiB) while accumulating the scores."""


def accumulated_attention(q: Tensor, ctx: LayerContext) -> Tensor:
    """H2O's heavy-hitter scores ``[b, kv_heads, n]``: for each entry, the attention
    probability summed over the queries ``q`` ``[b, Hq, t, d]`` (the forward's last ``t``
    tokens) and over the query heads of its KV head."""
    b, hq, t, _ = q.shape
    n, kv_heads = ctx.layer.num_entries, ctx.layer.keys.shape[1]
    positions = ctx.step.positions[-t:]
    rows = max(1, LOGIT_BLOCK // (b * hq * n))
    total = torch.zeros(b, hq, n, device=q.device)
    for start in range(0, t, rows):
        sl = slice(start, start + rows)
        probs = torch.softmax(ctx.logits(q[:, :, sl], positions[sl]), dim=-1)
        total += probs.sum(dim=2)
    return total.reshape(b, kv_heads, hq // kv_heads, n).sum(dim=2)


@register
@dataclass(frozen=True)
class H2O(CompressMethod):
    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = "Zhang et al., H2O: Heavy-Hitter Oracle, NeurIPS 2023, arXiv:2306.14048"
    summary: ClassVar[str] = "Accumulated attention of every prompt query (heavy hitters) + recent."

    budget: Budget = param(0.2, "entries kept per layer and KV head (paper: 20% of the context)")
    recent: float = param(
        0.5, "share of the budget kept as the most recent entries (paper: 10% of 20%)",
        min=0.0, max=1.0,
    )

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        n = ctx.layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        recent = round(self.recent * budget)
        if recent == budget:
            return torch.arange(n - recent, n, device=q.device)
        scores = accumulated_attention(q, ctx)
        return top_k_plus_window(scores[..., : n - recent], budget, recent)
