"""SnapKV: keep what the last queries attend to.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv:2404.14469. The last ``window`` queries of the prompt (the observation window) vote:
``s_j = sum_i softmax(Q_win K^T / sqrt(d))_ij`` for entries before the window, smoothed by a
1-D pooling, reduced over the query heads of each KV head (GQA), and each KV head keeps its
top ``budget - window`` entries plus the window. When the question is in the prompt this is
query-aware; in a multi-request session the window is the context's tail (query-agnostic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.compress.base import CompressMethod, ScoredCompression
from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register


@register
@dataclass(frozen=True)
class SnapKV(ScoredCompression):
    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "Li et al., SnapKV, NeurIPS 2024, arXiv:2404.14469"
    summary: ClassVar[str] = "Observation-window attention votes; top entries per KV head."

    budget: Budget = param(2048, "entries kept per layer and KV head (window included)")
    window: int = param(32, "observation window: the last prompt queries that vote", min=1, max=512)
    kernel: int = param(5, "pooling kernel size (odd)", min=1, max=63)
    pooling: Literal["avg", "max"] = param("avg", "1-D pooling of the votes")
    gqa_reduce: Literal["mean", "max"] = param("mean", "reduce query heads to their KV head")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel % 2 == 0:
            from kvlab.errors import RecipeError

            raise RecipeError(f"{self.name}(kernel={self.kernel}): the pooling kernel must be odd")

    def score(self, q_window: Tensor, ctx: LayerContext, window: int) -> Tensor:
        q_pos = ctx.positions[-window:]
        probs = torch.softmax(ctx.logits(q_window, q_pos), dim=-1)  # [b, Hq, w, n]
        votes = probs[..., : probs.shape[-1] - window].sum(dim=-2)  # [b, Hq, n - w]
        b, hq, m = votes.shape
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        votes = pool(votes.reshape(b * hq, 1, m), self.kernel, stride=1, padding=self.kernel // 2)
        kv_heads = ctx.layer.kv_heads
        votes = votes.reshape(b, kv_heads, hq // kv_heads, m)
        return votes.mean(dim=2) if self.gqa_reduce == "mean" else votes.amax(dim=2)


@dataclass(frozen=True)
class SnapKVVoting(CompressMethod):
    """Base of methods that build on SnapKV's observation-window votes (CaM, KVMerger): it
    holds SnapKV's hyper-parameters once and hands out the configured :class:`SnapKV`."""

    budget: Budget = param(2048, "entries kept per layer and KV head (window included)")
    window: int = param(32, "observation window: the last prompt queries that vote", min=1, max=512)
    kernel: int = param(5, "SnapKV pooling kernel size (odd)", min=1, max=63)
    pooling: Literal["avg", "max"] = param("avg", "SnapKV 1-D pooling of the votes")
    gqa_reduce: Literal["mean", "max"] = param("mean", "SnapKV: query heads -> their KV head")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.snapkv()  # validates the SnapKV parameters (odd kernel)

    def snapkv(self) -> SnapKV:
        """SnapKV with this method's parameters: its votes and its eviction."""
        return SnapKV(
            budget=self.budget, window=self.window, kernel=self.kernel, pooling=self.pooling,
            gqa_reduce=self.gqa_reduce,
        )
