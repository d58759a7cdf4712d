"""H2O: keep the heavy hitters — the entries that gathered the most attention — and the
most recent entries.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv:2306.14048. Each head accumulates, for every entry, the attention
probability every query has given it; the cache keeps the ``budget - recent`` entries with the
largest accumulated score among the older ones, plus the ``recent`` most recent entries
(reference code: ``hh_score`` summed over queries, top ``hh_size`` of
``hh_score[:, :seq_len - recent_size]``, then the last ``recent_size``).

Prefill form:

- The scores are the column sums of the causal attention of *every prompt query* over the
  entries before it: each prompt chunk's queries add theirs as the chunk is encoded
  (:meth:`H2O.observe`, computed in blocks of queries so the fp32 probabilities stay small), so
  a prompt of several chunks (:attr:`Engine.prefill_chunk`, 1024 by default) is scored whole.
- Afterwards each decoding step's query adds its attention, where the paper's per-step
  eviction applies (a question appended to a session is encoded without adding its queries).
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
from kvlab.compress.decoding import SIZE, CacheSize, all_but, cache_size
from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register, resolve_budget

SCORES = "h2o.scores"
LOGIT_BLOCK = 1 << 24
"""Most fp32 attention probabilities held at once (64 MiB) while accumulating the scores."""


def accumulated_attention(q: Tensor, ctx: LayerContext) -> Tensor:
    """H2O's heavy-hitter scores ``[b, kv_heads, n]``: for each entry, the attention
    probability summed over the queries ``q`` ``[b, Hq, t, d]`` (the forward's last ``t``
    tokens) and over the query heads of its KV head."""
    b, hq, t, _ = q.shape
    n, kv_heads = ctx.layer.num_entries, ctx.layer.kv_heads
    positions = ctx.positions[-t:]
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

    def observe(self, q: Tensor, ctx: LayerContext) -> None:
        """Add this prompt chunk's attention to every entry's accumulated score."""
        layer = ctx.layer
        scores = accumulated_attention(q, ctx)
        heavy = layer.side.get(SCORES)
        if isinstance(heavy, HeavyHitters):
            heavy.grow(layer.num_entries)
            heavy.scores += scores
        else:
            layer.side[SCORES] = HeavyHitters(scores)

    def compress(self, q: Tensor, ctx: LayerContext) -> None:
        """Evict at the end of the prefill by the scores every prompt query accumulated
        (:meth:`observe`), and keep the scores of what stays, so decoding goes on accumulating
        (the per-step form)."""
        layer = ctx.layer
        n = layer.num_entries
        budget = resolve_budget(self.budget, n)
        heavy = layer.side.get(SCORES)
        if not isinstance(heavy, HeavyHitters):  # called without the engine's observe
            self.observe(q, ctx)
            heavy = layer.side[SCORES]
        layer.side[SIZE] = CacheSize(budget)
        keep = self.choose(heavy.scores, n, budget)
        if keep is not None:
            layer.select(keep)

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        n = ctx.layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        return self.choose(accumulated_attention(q, ctx), n, budget)

    def choose(self, scores: Tensor, n: int, budget: int) -> Tensor | None:
        """Top ``budget - recent`` heavy hitters per KV head plus the ``recent`` newest."""
        if n <= budget:
            return None
        recent = round(self.recent * budget)
        if recent == budget:
            return torch.arange(n - recent, n, device=scores.device)
        return top_k_plus_window(scores[..., : n - recent], budget, recent)

    @property
    def evicts_while_decoding(self) -> bool:
        return True

    def after_decode_step(self, q: Tensor, ctx: LayerContext) -> None:
        """H2O's per-step form: add the new query's attention to every entry's score; once
        over the cache size, drop the lowest-scored entry older than the recent window."""
        layer = ctx.layer
        heavy, size = layer.side.get(SCORES), cache_size(layer)
        if not isinstance(heavy, HeavyHitters) or size is None:
            return
        n, kv_heads = layer.num_entries, layer.kv_heads
        probs = torch.softmax(ctx.logits(q, ctx.positions), dim=-1)[:, :, 0]  # [b, Hq, n]
        b, hq, _ = probs.shape
        heavy.grow(n)
        heavy.scores += probs.reshape(b, kv_heads, hq // kv_heads, n).sum(dim=2)
        if n <= size:
            return
        recent = round(self.recent * size)
        drop = heavy.scores[..., : n - recent].argmin(dim=-1)  # [b, kv_heads]
        layer.select(all_but(drop, n))


class HeavyHitters:
    """Accumulated attention ``[b, kv_heads, n]`` of every kept entry (fp32, counted)."""

    def __init__(self, scores: Tensor) -> None:
        self.scores = scores

    def grow(self, n: int) -> None:
        """Zero scores for entries appended since the last step."""
        missing = n - self.scores.shape[-1]
        if missing > 0:
            pad = self.scores.new_zeros(*self.scores.shape[:-1], missing)
            self.scores = torch.cat([self.scores, pad], dim=-1)

    def nbytes(self) -> int:
        return self.scores.numel() * self.scores.element_size()

    def truncate(self, num_entries: int) -> None:
        self.scores = self.scores[..., :num_entries].clone()

    def on_select(self, keep: Tensor) -> None:
        if keep.dim() == 1:
            self.scores = self.scores.index_select(-1, keep)
        else:
            self.scores = self.scores.gather(-1, keep)
