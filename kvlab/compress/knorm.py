"""KNorm: keep the keys with the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024, arXiv:2406.11430. Keys with a low norm draw high attention, so each KV head keeps
its ``budget`` entries of lowest ``||k||`` (score ``-||k||``); no attention is computed, and
the query plays no part (query-agnostic by construction).

Defaults, and why:

- ``window=0``: neither the paper nor its code (``l2_compress``) nor kvpress's ``KnormPress``
  protects recent tokens; a window is offered for comparison with the SnapKV family.
- ``skip_layers=2``: the authors' code is run with ``skip_layers=[0, 1]`` (README), because
  the norm/attention correlation does not hold in the first two layers; kvpress compresses
  every layer (``skip_layers=0``). Skipped layers keep every entry, and the measured
  ``kv_tokens`` (a mean over layers) shows it.

The norm is taken on the stored keys; RoPE is a rotation, so the norm is the same before and
after it. The authors sort by norm and keep a prefix; kvlab keeps the entries in their
original order (the set is the same, ties aside).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.compress.base import ScoredCompression
from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register


@register
@dataclass(frozen=True)
class KNorm(ScoredCompression):
    name: ClassVar[str] = "knorm"
    paper: ClassVar[str] = (
        "Devoto et al., L2 Norm-Based KV Cache Compression, EMNLP 2024, arXiv:2406.11430"
    )
    summary: ClassVar[str] = "Keep the lowest-norm keys per KV head (no attention needed)."

    budget: Budget = param(2048, "entries kept per layer and KV head (window included)")
    window: int = param(0, "most recent entries always kept (paper: none)", min=0, max=512)
    skip_layers: int = param(
        2, "the first layers keep everything (authors' code: layers 0 and 1; kvpress: 0)", min=0
    )

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        if ctx.index < self.skip_layers:
            return None
        return super().keep(q, ctx)

    def score(self, q_window: Tensor, ctx: LayerContext, window: int) -> Tensor:
        keys = ctx.layer.keys
        return -keys[:, :, : keys.shape[2] - window].float().norm(dim=-1)
