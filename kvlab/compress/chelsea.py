"""Chelsea: merge similar keys within chunks into centroids (chunked soft matching).

Hu et al., "Efficient Long-Context LLM Inference via KV Cache Clustering", arXiv:2506.11418.
Keys are highly similar along the sequence; Chelsea cuts the sequence into chunks, splits each
chunk into two sets by alternating tokens and merges the most similar pairs across the two sets
(ToMe-style bipartite soft matching) into centroids. The abstract reports up to 80% less KV
memory and up to 3.19x faster decoding.

kvlab's form, at the end of the prompt prefill, per batch row and KV head:

1. The first ``sink`` and the last ``window`` entries are kept as they are. The entries in
   between (the mergeable region) are cut into chunks of ``chunk`` entries (the last may be
   shorter).
2. The reduction ``r = n - budget`` is spread over the chunks in proportion to their size
   (floor of ``r * size / region``, the rest one by one to the largest remainders, earliest
   chunk first on ties); a chunk never goes below one entry.
3. Within a chunk: set A = the even offsets, set B = the odd offsets. Each ``a`` finds its most
   similar ``b`` (cosine similarity of the keys as attention sees them, rotated at their own
   positions; ties: the earliest ``b``); the ``q`` ``a``'s with the highest best-match
   similarity (ties: the earliest ``a``) are merged into their ``b``: the ``b``'s key and value
   become the size-weighted mean of the ``b`` and the ``a``'s merged into it (sizes start at
   1), and it keeps the ``b``'s position. Unmerged ``a``'s and every ``b`` stay, in order.
4. When a chunk must remove more than ``|A|`` entries, the matching repeats on its survivors
   (alternating again by their order) until its quota is reached.

Every KV head removes exactly the same number of entries, so the layer stays rectangular
(``LayerKV.select`` with ``[b, kv_heads, budget]``, then the merged keys and values are
written over the selected ones, as KVMerger does). Nothing happens when the budget covers the
context, so ``chelsea(budget=1.0)`` is ``full``.

Interpretations (kvlab has only the abstract):

- Merged keys and values are plain size-weighted means, computed in the form the layer stores
  keys (as KVMerger does); in later rounds a merged entry's similarity key is the size-weighted
  mean of its members' attention keys (ToMe's rule). Cluster sizes are not kept after the
  prefill, and attention gets no ``log(size)`` bias (ToMe's proportional attention).
- ``sink=4`` (StreamingLLM's attention sinks) and ``window=32`` (SnapKV's observation window)
  are never merged; ``chunk=64``; ``budget=0.5`` (the abstract's "up to 80% less" is 0.2).
- A budget smaller than ``sink + window`` shrinks the sinks first to the budget, then the
  window to what is left (StreamingLLM's rule); if nothing is left for the region, it is
  evicted. When the budget leaves fewer entries for the region than it has chunks, the chunks
  grow to ``ceil(region / kept)`` entries, so every chunk can keep one centroid.
- Compression while decoding is not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.compress.base import CompressMethod, attention_keys, select_merged
from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register, resolve_budget


@dataclass
class Clusters:
    """``N`` independent rows of ``c`` entries (a chunk of one batch row and KV head each):
    ``probe`` (keys as attention sees them, for similarity), ``keys`` (as stored) and ``values``
    ``[N, c, d]`` in fp32, ``index`` ``[N, c]`` (the entry each cluster is stored at) and
    ``size`` ``[N, c]`` (entries merged into each cluster, fp32)."""

    probe: Tensor
    keys: Tensor
    values: Tensor
    index: Tensor
    size: Tensor

    def take(self, slots: Tensor) -> Clusters:
        """The clusters at ``slots`` ``[N, k]`` of every row."""
        d = self.keys.shape[-1]
        at = slots[..., None].expand(-1, -1, d)
        return Clusters(
            self.probe.gather(1, at), self.keys.gather(1, at), self.values.gather(1, at),
            self.index.gather(1, slots), self.size.gather(1, slots),
        )


def soft_matching_round(clusters: Clusters, merges: int) -> Clusters:
    """One round of bipartite soft matching: merge the ``merges`` entries at even offsets whose
    best match among the odd offsets is the most similar into that match (size-weighted
    means). Returns the ``c - merges`` survivors of every row, in order."""
    rows, c = clusters.size.shape
    a = clusters.take(torch.arange(0, c, 2, device=clusters.size.device).expand(rows, -1))
    b = clusters.take(torch.arange(1, c, 2, device=clusters.size.device).expand(rows, -1))
    similarity = F.normalize(a.probe, dim=-1) @ F.normalize(b.probe, dim=-1).transpose(1, 2)
    match = similarity.argmax(dim=-1)  # [N, |A|]: the first most similar b
    best = similarity.gather(-1, match[..., None])[..., 0]
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged, stay = order[:, :merges], order[:, merges:].sort(dim=-1).values
    target = match.gather(-1, merged)  # [N, merges]: the b each merged a joins
    weight = a.size.gather(-1, merged)
    size = b.size.scatter_add(-1, target, weight)

    def centroid(a_x: Tensor, b_x: Tensor) -> Tensor:
        d = b_x.shape[-1]
        add = (weight[..., None] * a_x.gather(1, merged[..., None].expand(-1, -1, d)))
        total = (b.size[..., None] * b_x).scatter_add(1, target[..., None].expand(-1, -1, d), add)
        return total / size[..., None]

    b = Clusters(
        centroid(a.probe, b.probe), centroid(a.keys, b.keys), centroid(a.values, b.values),
        b.index, size,
    )
    a = a.take(stay)
    # Survivors back in chunk order: the a at slot i sat at offset 2i, the b at slot j at 2j+1.
    offsets = torch.cat([2 * stay, 2 * torch.arange(b.size.shape[1], device=stay.device)
                         .expand(rows, -1) + 1], dim=-1)
    joined = Clusters(*(torch.cat([x, y], dim=1) for x, y in zip(
        (a.probe, a.keys, a.values, a.index, a.size), (b.probe, b.keys, b.values, b.index, b.size)
    )))
    return joined.take(offsets.argsort(dim=-1))


def chunked_soft_matching(clusters: Clusters, quota: int) -> Clusters:
    """Remove ``quota`` entries from every row (``quota < c``) by rounds of soft matching."""
    while quota > 0:
        merges = min(quota, (clusters.size.shape[1] + 1) // 2)
        clusters = soft_matching_round(clusters, merges)
        quota -= merges
    return clusters


def chunk_sizes(region: int, chunk: int, kept: int) -> list[int]:
    """Sizes of the chunks of a region of ``region`` entries that keeps ``kept >= 1``: ``chunk``
    each (the last shorter), or larger chunks when there would be more chunks than ``kept``."""
    if math.ceil(region / chunk) > kept:
        chunk = math.ceil(region / kept)
    sizes = [chunk] * (region // chunk)
    return sizes + [region % chunk] if region % chunk else sizes


def spread(reduction: int, sizes: list[int]) -> list[int]:
    """Entries each chunk removes: ``reduction`` in proportion to the chunk sizes (floors, then
    the largest remainders, earliest first), each chunk keeping at least one entry."""
    region = sum(sizes)
    quotas = [reduction * s // region for s in sizes]
    remainders = sorted(range(len(sizes)), key=lambda i: (-(reduction * sizes[i] % region), i))
    left = reduction - sum(quotas)
    while left:
        for i in remainders:
            if left and quotas[i] < sizes[i] - 1:
                quotas[i] += 1
                left -= 1
    return quotas


@register
@dataclass(frozen=True)
class Chelsea(CompressMethod):
    name: ClassVar[str] = "chelsea"
    paper: ClassVar[str] = (
        "Hu et al., Efficient Long-Context LLM Inference via KV Cache Clustering (Chelsea), "
        "arXiv:2506.11418"
    )
    summary: ClassVar[str] = "Per chunk, alternate tokens into two sets; merge similar keys (ToMe)."

    budget: Budget = param(0.5, "entries kept per layer and KV head (sinks and window included)")
    chunk: int = param(64, "entries per chunk of the mergeable region", min=2)
    window: int = param(32, "most recent entries, never merged", min=0)
    sink: int = param(4, "first entries, never merged (attention sinks)", min=0)

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """The entries that stay ``[b, kv_heads, budget]`` (cluster representatives, sinks and
        window); the merge itself happens in :meth:`compress`."""
        plan = self.plan(ctx)
        return None if plan is None else plan[0]

    def plan(self, ctx: LayerContext) -> tuple[Tensor, Clusters | None, int] | None:
        """``(keep, merged region clusters [b, kv_heads, kept] or None, sink)``, or ``None`` to
        keep everything."""
        layer = ctx.layer
        n = layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        sink = min(self.sink, budget)
        window = min(self.window, budget - sink)
        region, kept = n - sink - window, budget - sink - window
        b, h, _, d = layer.keys.shape
        device = layer.keys.device
        sinks = torch.arange(sink, device=device).expand(b, h, sink)
        recent = torch.arange(n - window, n, device=device).expand(b, h, window)
        if kept == 0:
            return torch.cat([sinks, recent], dim=-1), None, sink
        sizes = chunk_sizes(region, self.chunk, kept)
        quotas = spread(region - kept, sizes)
        probe = attention_keys(ctx).float()
        starts = [sink + sum(sizes[:i]) for i in range(len(sizes))]
        out = [sum(s - r for s, r in zip(sizes[:i], quotas[:i])) for i in range(len(sizes))]
        merged = Clusters(
            torch.empty(b, h, kept, d, device=device), torch.empty(b, h, kept, d, device=device),
            torch.empty(b, h, kept, d, device=device),
            torch.empty(b, h, kept, dtype=torch.long, device=device),
            torch.empty(b, h, kept, device=device),
        )
        # Chunks of the same size and quota merge together (one extra batch dimension).
        for size, quota in sorted(set(zip(sizes, quotas))):
            group = [i for i in range(len(sizes)) if (sizes[i], quotas[i]) == (size, quota)]
            g = len(group)
            entries = (torch.tensor([starts[i] for i in group], device=device)[:, None]
                       + torch.arange(size, device=device)).flatten()  # [g * size]

            def rows(x: Tensor) -> Tensor:
                return x.index_select(2, entries).float().reshape(b * h * g, size, d)

            index = entries.reshape(g, size).expand(b, h, g, size).reshape(b * h * g, size)
            clusters = chunked_soft_matching(Clusters(
                rows(probe), rows(layer.keys), rows(layer.values), index,
                torch.ones(b * h * g, size, device=device),
            ), quota)
            slots = (torch.tensor([out[i] for i in group], device=device)[:, None]
                     + torch.arange(size - quota, device=device)).flatten()
            for name in ("probe", "keys", "values"):
                getattr(merged, name)[:, :, slots] = getattr(clusters, name).reshape(b, h, -1, d)
            merged.index[:, :, slots] = clusters.index.reshape(b, h, -1)
            merged.size[:, :, slots] = clusters.size.reshape(b, h, -1)
        return torch.cat([sinks, merged.index, recent], dim=-1), merged, sink

    def compress(self, q: Tensor, ctx: LayerContext) -> None:
        plan = self.plan(ctx)
        if plan is None:
            return
        keep, merged, sink = plan
        if merged is None:
            ctx.layer.select(keep)
        else:
            select_merged(ctx.layer, keep, sink, merged.keys, merged.values)
