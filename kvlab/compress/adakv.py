"""AdaKV: the layer's budget shared unevenly among its KV heads, stored ragged.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", arXiv:2407.11550. Some heads concentrate their attention on a few entries,
others spread it; a uniform per-head budget wastes entries on the first kind. AdaKV scores
entries as its base method does (SnapKV's observation-window votes, or PyramidKV's, which also
sets each layer's budget), then, for a layer that chooses ``C = B - w`` entries per head
(``B`` its budget, ``w`` the window):

1. takes the top ``Hkv * C`` scores of all its KV heads together; ``c_h`` = hits of head ``h``;
2. gives head ``h`` the capacity ``alpha * C + (1 - alpha) * c_h`` (the *safeguard* ``alpha``,
   0.2 in the reference code, keeps every head a floor), rounded so the capacities sum to
   ``Hkv * C`` exactly (largest remainders);
3. keeps in head ``h`` its top ``capacity_h`` entries by its own scores, plus the window.

The layer's total is the same as SnapKV's (``Hkv * B`` entries); only its split differs. The
heads really hold different numbers of entries (:class:`~kvlab.engine.ragged.RaggedLayerKV`),
so the saving is physical (kvpress's AdaKVPress masks a rectangular cache instead). Decoded
tokens are appended to every head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from kvlab.compress.base import Keep
from kvlab.compress.pyramidkv import PyramidKV
from kvlab.compress.snapkv import SnapKV, SnapKVVoting
from kvlab.engine.context import LayerContext
from kvlab.registry import param, register, resolve_budget


def head_capacities(scores: Tensor, choose: int, alpha: float) -> list[int]:
    """AdaKV's per-head capacities for ``scores`` ``[kv_heads, m]`` when each head would
    choose ``choose`` entries under a uniform split; they sum to ``kv_heads * choose``."""
    heads, m = scores.shape
    top = scores.reshape(-1).topk(heads * choose).indices
    hits = torch.bincount(top // m, minlength=heads).double()
    wanted = alpha * choose + (1 - alpha) * hits
    capacities = wanted.floor()
    short = heads * choose - int(capacities.sum())
    if short > 0:  # largest remainders first (ties: lower head index)
        order = sorted(range(heads), key=lambda h: (-(wanted[h] - capacities[h]).item(), h))
        for h in order[:short]:
            capacities[h] += 1
    return [int(c) for c in capacities]


@register
@dataclass(frozen=True)
class AdaKV(SnapKVVoting):
    name: ClassVar[str] = "adakv"
    paper: ClassVar[str] = "Feng et al., Ada-KV, arXiv:2407.11550"
    summary: ClassVar[str] = "SnapKV/PyramidKV scores; the layer budget split unevenly over KV heads."
    ragged_heads: ClassVar[bool] = True

    scorer: Literal["snapkv", "pyramidkv"] = param(
        "snapkv", "base method: its scores (and, for pyramidkv, its layer budgets)"
    )
    alpha: float = param(0.2, "safeguard: share of each head's uniform budget it always gets", min=0.0, max=1.0)
    beta: float = param(20.0, "pyramidkv steepness (scorer=pyramidkv only)", min=1.0)

    def base(self) -> SnapKV:
        """The scoring method, with this method's parameters."""
        snapkv = self.snapkv()
        if self.scorer == "pyramidkv":
            return PyramidKV(**{**snapkv.__dict__, "beta": self.beta})
        return snapkv

    def keep(self, q: Tensor, ctx: LayerContext) -> Keep:
        layer = ctx.layer
        n = layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        base = self.base()
        window = min(self.window, q.shape[2], budget)
        choose = base.layer_budget(budget, window, ctx) - window
        recent = torch.arange(n - window, n, device=q.device)
        if choose <= 0:
            return recent
        scores = base.score(q[:, :, q.shape[2] - window :], ctx, window)[0]  # [kv_heads, n - w]
        return [
            torch.cat([head_scores.topk(capacity).indices, recent]).sort().values
            for head_scores, capacity in zip(scores, head_capacities(scores, choose, self.alpha))
        ]
