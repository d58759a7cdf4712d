"""The compress stage: which KV entries are kept after the prompt is prefilled.

A compress method returns the indices to keep; :class:`LayerKV.select` then replaces the
stored tensors with smaller ones, so the savings are physical. Score-based methods only say
how to score (:meth:`ScoredCompression.score`); the shared rule — keep the top
``budget - window`` scored entries plus the last ``window`` — lives here once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.attention import LayerContext
from kvlab.registry import Budget, Method, resolve_budget


@dataclass(frozen=True)
class CompressMethod(Method, ABC):
    """Base of compress methods: :meth:`keep` chooses, the layer shrinks."""

    stage: ClassVar[str] = "compress"

    def compress(self, q: Tensor, ctx: LayerContext) -> None:
        """Shrink ``ctx.layer`` at the end of the prompt prefill. ``q`` ``[b, Hq, t, d]`` are the
        unrotated queries of the forward's last ``t`` tokens (the observation window source)."""
        keep = self.keep(q, ctx)
        if keep is not None:
            ctx.layer.select(keep)

    @abstractmethod
    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Sorted indices of the entries to keep: ``[k]`` for all heads or
        ``[b, kv_heads, k]`` per head; ``None`` keeps everything."""


def top_k_plus_window(scores: Tensor, budget: int, window: int) -> Tensor:
    """Indices ``[b, heads, budget]`` (sorted) of the top ``budget - window`` entries by
    ``scores`` ``[b, heads, n - window]`` plus the last ``window`` entries."""
    prefix = scores.shape[-1]
    top = scores.topk(budget - window, dim=-1).indices
    recent = torch.arange(prefix, prefix + window, device=scores.device)
    recent = recent.expand(*scores.shape[:-1], window)
    return torch.cat([top, recent], dim=-1).sort(dim=-1).values


@dataclass(frozen=True)
class ScoredCompression(CompressMethod):
    """Keep the top-scored entries per KV head plus an observation window of recent ones."""

    budget: Budget
    window: int

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        n = ctx.layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        window = min(self.window, q.shape[2], budget)
        if budget == window:
            return torch.arange(n - window, n, device=q.device)
        scores = self.score(q[:, :, -window:], ctx, window)
        return top_k_plus_window(scores, budget, window)

    @abstractmethod
    def score(self, q_window: Tensor, ctx: LayerContext, window: int) -> Tensor:
        """Scores ``[b, kv_heads, n - window]`` of the entries before the window."""
