"""KVMerger: merge runs of consecutive entries whose keys point the same way.

Wang et al., "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on
Long-Context Tasks", arXiv:2407.08454. Keys of neighbouring tokens are often nearly parallel;
such runs are merged into one entry instead of being evicted. Per KV head:

1. **Merging sets**: consecutive entries ``j, j+1`` are *linked* when the cosine similarity of
   their keys (rotated, as attention sees them) exceeds ``threshold``; the runs of linked
   entries are the merging sets (a set of one is an ordinary entry).
2. **Pivot**: the member with the most attention from the observation window (SnapKV's votes,
   smoothed by ``kernel``; ties go to the earliest member).
3. **Gaussian kernel weights**: ``g_i = exp(-||k_p - k_i||^2 / (2 sigma^2))`` for every member
   ``i`` (``g_p = 1``), normalised over the set; the merged key and value
   ``sum_i g_i k_i / sum g``, ``sum_i g_i v_i / sum g`` are stored at the pivot's position and
   the other members are dropped. Keys are averaged in the form the layer stores them.

**Budget.** Merging comes first, eviction only if the cache is still over budget: every KV
head ends with exactly ``budget`` entries — the storage holds the same number of entries in
every head (``LayerKV.select`` takes ``[b, kv_heads, k]``) — by this rule, applied to the
entries before the observation window (the window, ``window`` entries, is always kept as it
is, as in every SnapKV-style method):

- a head with at most ``r = n - budget`` links merges all its sets, then evicts its
  lowest-scored entries until ``budget`` remain (a merged entry scores the sum of its members'
  votes: it stands for all of them);
- a head with more than ``r`` links keeps only its ``r`` most similar links — as if its
  threshold were raised to reach the budget exactly — so merging alone brings it to
  ``budget`` and nothing is evicted.

So the heads merge as much as their keys allow, never fewer than ``budget`` entries remain,
and no head evicts an entry because another head merged. Nothing happens when the budget
covers the context.

kvlab's choices where the paper's abstract (all kvlab's reference has) gives no value:
``threshold=0.8``; ``sigma=0`` means a per-set width, ``sigma^2`` = the mean squared distance
of the set's other members to the pivot (scale-free: the farthest-typical member weighs
``exp(-1/2)`` of the pivot); ``kernel=1`` (no smoothing: smoothing would blur which member of
a run draws the attention); ``budget=0.5`` (the paper evaluates 50% and 35% budgets);
``window=32`` (SnapKV's). Compression while decoding is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.compress.base import attention_keys, select_merged
from kvlab.compress.snapkv import SnapKVVoting
from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register, resolve_budget


@dataclass
class Merged:
    """The merged sets of one layer, per KV head, padded to ``P`` (the entries before the
    window): ``keys``/``values`` ``[b, h, P, d]`` (fp32), ``pivot`` ``[b, h, P]`` (entry index
    of each set's pivot), ``score`` ``[b, h, P]`` (-inf past a head's last set)."""

    keys: Tensor
    values: Tensor
    pivot: Tensor
    score: Tensor


def link_runs(similarity: Tensor, threshold: float, links: int) -> Tensor:
    """Which neighbours ``j, j+1`` are merged ``[b, h, P - 1]``: similarity above
    ``threshold``, at most ``links`` per head (the most similar)."""
    linked = similarity > threshold
    if links >= similarity.shape[-1]:
        return linked
    masked = similarity.masked_fill(~linked, float("-inf"))
    top = masked.topk(links, dim=-1).indices
    chosen = torch.zeros_like(linked)
    chosen.scatter_(-1, top, linked.gather(-1, top))
    return chosen


def merge_sets(
    keys: Tensor, stored_keys: Tensor, values: Tensor, scores: Tensor, linked: Tensor,
    sigma: float,
) -> Merged:
    """Merge the runs ``linked`` ``[b, h, P - 1]`` of the ``P`` entries: ``keys`` (rotated,
    for distances), ``stored_keys`` and ``values`` ``[b, h, P, d]``, ``scores`` ``[b, h, P]``."""
    b, h, P, d = keys.shape
    starts = F.pad(~linked, (1, 0), value=True)  # entry j opens a set
    set_id = starts.long().cumsum(-1) - 1  # [b, h, P]
    empty = torch.zeros(b, h, P, device=keys.device)
    best = empty.scatter_reduce(-1, set_id, scores, "amax", include_self=False)
    index = torch.arange(P, device=keys.device).expand(b, h, P)
    candidate = torch.where(scores == best.gather(-1, set_id), index, P)
    pivot = torch.full((b, h, P), P, device=keys.device, dtype=torch.long)
    pivot = pivot.scatter_reduce(-1, set_id, candidate, "amin", include_self=True)
    pivot_of = pivot.gather(-1, set_id)  # [b, h, P]: the pivot of each entry's set
    pivot_key = keys.gather(2, pivot_of[..., None].expand(-1, -1, -1, d))
    distance = (keys - pivot_key).square().sum(-1)  # [b, h, P]
    if sigma > 0:
        width = torch.full_like(distance, 2 * sigma**2)
    else:
        size = empty.scatter_add(-1, set_id, torch.ones_like(distance))
        total = empty.scatter_add(-1, set_id, distance)
        mean = total / (size - 1).clamp(min=1)  # over the members other than the pivot
        width = 2 * mean.gather(-1, set_id)
    weight = torch.where(distance > 0, torch.exp(-distance / width), torch.ones_like(distance))
    norm = empty.scatter_add(-1, set_id, weight).gather(-1, set_id)
    weight = (weight / norm)[..., None]
    slots = set_id[..., None].expand(-1, -1, -1, d)
    zeros = torch.zeros(b, h, P, d, device=keys.device)
    merged_keys = zeros.scatter_add(2, slots, weight * stored_keys)
    merged_values = zeros.scatter_add(2, slots, weight * values)
    score = empty.scatter_add(-1, set_id, scores)
    sets = set_id[..., -1:] + 1  # [b, h, 1]
    score = score.masked_fill(torch.arange(P, device=keys.device) >= sets, float("-inf"))
    return Merged(merged_keys, merged_values, pivot.clamp(max=P - 1), score)


@register
@dataclass(frozen=True)
class KVMerger(SnapKVVoting):
    name: ClassVar[str] = "kvmerger"
    paper: ClassVar[str] = (
        "Wang et al., Model Tells You Where to Merge (KVMerger), arXiv:2407.08454"
    )
    summary: ClassVar[str] = "Runs of similar keys merged at their pivot (Gaussian); then evict."

    budget: Budget = param(0.5, "entries kept per layer and KV head (paper: 50% and 35%)")
    threshold: float = param(
        0.8, "cosine similarity of neighbouring keys above which they merge", min=-1.0, max=1.0
    )
    sigma: float = param(
        0.0, "Gaussian kernel width (0: per set, the RMS distance of its keys to the pivot)",
        min=0.0,
    )
    kernel: int = param(1, "SnapKV pooling kernel of the votes (odd; 1: none)", min=1, max=63)

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """The entries that stay (pivots and window) ``[b, kv_heads, budget]``; the merge
        itself happens in :meth:`compress`."""
        plan = self.plan(q, ctx)
        return None if plan is None else plan[0]

    def plan(self, q: Tensor, ctx: LayerContext) -> tuple[Tensor, Merged | None, Tensor] | None:
        """``(keep, merged sets, chosen set slots)``, or ``None`` to keep everything."""
        layer = ctx.layer
        n = layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        window = min(self.window, q.shape[2], budget)
        prefix, choose = n - window, budget - window
        recent = torch.arange(prefix, n, device=q.device)
        b, h = layer.keys.shape[:2]
        if choose == 0:
            return recent.expand(b, h, window), None, recent[:0]
        scores = self.snapkv().score(q[:, :, q.shape[2] - window :], ctx, window).float()
        keys = attention_keys(ctx)[:, :, :prefix].float()
        similarity = F.cosine_similarity(keys[:, :, 1:], keys[:, :, :-1], dim=-1)
        linked = link_runs(similarity, self.threshold, n - budget)
        merged = merge_sets(
            keys, layer.keys[:, :, :prefix].float(), layer.values[:, :, :prefix].float(), scores,
            linked, self.sigma,
        )
        slots = merged.score.topk(choose, dim=-1).indices.sort(dim=-1).values  # [b, h, choose]
        pivots = merged.pivot.gather(-1, slots)
        keep = torch.cat([pivots, recent.expand(b, h, window)], dim=-1)
        return keep, merged, slots

    def compress(self, q: Tensor, ctx: LayerContext) -> None:
        plan = self.plan(q, ctx)
        if plan is None:
            return
        keep, merged, slots = plan
        if merged is None:
            ctx.layer.select(keep)
            return
        index = slots[..., None].expand(-1, -1, -1, ctx.layer.keys.shape[-1])
        select_merged(ctx.layer, keep, 0, merged.keys.gather(2, index), merged.values.gather(2, index))
