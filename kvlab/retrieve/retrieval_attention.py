"""RetrievalAttention: exact attention on sinks + recent, vector retrieval for the rest.

Liu et al., "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector
Retrieval", arXiv:2409.10516. Each decoding step splits a layer's cache into a static part,
the first ``sink`` and the last ``recent`` entries, attended exactly, and the other keys,
held per KV head in an approximate-nearest-neighbour (maximum inner product) index on the
CPU; every query head retrieves its ``budget`` keys of highest ``q . k`` from its KV head's
index and attends exactly to them. The two partial attentions are merged exactly by their
log-sum-exp (:func:`kvlab.engine.kernels.merge_partials`), as the paper does to combine the
accelerator part with the CPU part.

The paper's point is that attention queries and keys have different distributions (queries
are out of distribution for an index built on keys), so it builds the index *with the
prefill's queries* (a RoarGraph-style graph: the query-key nearest-neighbour relation of the
prefill is projected onto the keys). kvlab uses faiss (``faiss-cpu``, a wheel on PyPI;
hnswlib ships only as an sdist, which needs a compiler here) and approximates that graph by
an inverted-file index whose partition follows the queries:

- ``index="ivf"`` (default): ``faiss.IndexIVFFlat`` with the inner-product metric; its
  ``lists`` centroids are k-means centroids of the *prefill queries* of the KV head's query
  heads (rotated, as they score the keys; a random sample of at most ``train_queries`` per
  KV head, gathered chunk by chunk during the prefill through
  :meth:`RetrieveMethod.observe`), and every key is filed under the query centroid that
  scores it highest (``argmax_c c . k``). A search scans the lists whose centroids score the
  step's query highest, exactly (flat lists). How many follows the budget, as the paper's
  search effort follows its top-k (its graph walk keeps a candidate list of at least ``k``
  and visits more vertices for a larger ``k``): an IVF search must scan at least the ``k``
  keys it returns, and recall needs a margin, so it probes ``max(probe, ceil(scan * k /
  mean list length))`` lists, ``scan`` keys scanned per key retrieved (all of them when that
  is more: then the search is exact). What is approximated: the paper's graph walk over
  query-bridged key neighbours is replaced by this query-trained partition. Without prefill
  queries (a sequence built only by appends) the centroids are trained on the keys.
- ``index="flat"``: ``faiss.IndexFlatIP``, exact top-``budget`` by ``q . k`` (the limit of
  an ideal index; used by the tests).

The index is built at the first decoding step (after any compression) over
``[sink, n - recent)``; as decoding proceeds, keys that leave the recent window are added
to it, so every entry is in exactly one of the two parts. The index lives in
``layer.side`` and counts in the cache's bytes: the faiss index's serialized size
(``len(faiss.serialize_index(index))``: the stored key copies, the list ids, the centroids),
plus the query sample until the index is trained. Keys are scored as stored (post-RoPE).
Every layer retrieves (the paper gives no dense layers). Each query head attends to its own
retrieved keys; a KV head gathers the union of its query heads' keys once
(:func:`~kvlab.retrieve.base.kv_head_union`: the heads of a group retrieve many keys alike),
each query head masking the others'. Not reproduced: the CPU/accelerator split and overlap
(everything runs on the model's device, the search on the CPU).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from kvlab.engine.cache import LayerKV
from kvlab.engine.context import LayerContext
from kvlab.engine.kernels import gather_entries, merge_partials, partial_attention
from kvlab.registry import Budget, param, register, resolve_budget
from kvlab.retrieve.base import RetrieveMethod, kv_head_union

INDEX_KEY = "retrieval_attention.index"
POINTS_PER_LIST = 39
"""faiss k-means wants at least this many training points per centroid (it warns below)."""


def _faiss():
    import faiss  # imported on use: a heavy extension, needed only by this method

    return faiss


class _OneThread:
    """Run faiss single-threaded: its OpenMP threads contend with torch's for the cores, and
    a search of a few queries gains nothing from them (measured here: 12 ms per search with
    2 threads under load, 0.6 ms with 1). The previous setting is restored on exit."""

    def __enter__(self) -> None:
        faiss = _faiss()
        self.previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        _faiss().omp_set_num_threads(self.previous)


class KeyIndex:
    """Per (batch row, KV head) faiss index over the keys of entries ``[start, end)``.

    ``queries`` ``[b, kv_heads, m, d]`` (fp32, CPU) is the sample of prefill queries the IVF
    centroids are trained on; it is dropped once they are. Local id ``i`` is entry
    ``start + i``.
    """

    def __init__(
        self, kind: str, lists: int, probe: int, train_queries: int, start: int, scan: float = 4.0
    ) -> None:
        self.kind, self.lists, self.probe, self.train_queries = kind, lists, probe, train_queries
        self.scan = scan
        self.start = self.end = start
        self.scanned = 0  # keys the last search scanned, over every KV head and query (faiss's count)
        self.queries: Tensor | None = None
        self.indexes: list[list[Any]] | None = None
        self._seen_queries = 0

    # -- the prefill's queries ------------------------------------------------------------
    def add_queries(self, rotated: Tensor, kv_heads: int) -> None:
        """Sample the rotated queries ``[b, Hq, t, d]`` of one prefill chunk."""
        b, hq, t, d = rotated.shape
        grouped = rotated.float().cpu().reshape(b, kv_heads, (hq // kv_heads) * t, d)
        self.queries = grouped if self.queries is None else torch.cat([self.queries, grouped], 2)
        if self.queries.shape[2] > self.train_queries:
            g = torch.Generator().manual_seed(self.queries.shape[2])
            keep = torch.randperm(self.queries.shape[2], generator=g)[: self.train_queries]
            self.queries = self.queries[:, :, keep.sort().values].contiguous()

    # -- building and growing --------------------------------------------------------------
    def _new_index(self, train: np.ndarray, d: int) -> Any:
        faiss = _faiss()
        if self.kind == "flat":
            return faiss.IndexFlatIP(d)
        lists = max(1, min(self.lists, train.shape[0] // POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        index.train(train)
        index.nprobe = min(self.probe, lists)
        return index

    def update(self, keys: Tensor, end: int) -> None:
        """Bring the index to cover entries ``[start, end)`` of ``keys`` ``[b, kv_heads, n, d]``
        (entries from ``end`` on, back in the recent window after a rollback, are removed)."""
        if end < self.end:
            self._remove_from(end)
        if end == self.end:
            return
        b, kv_heads, _, d = keys.shape
        new = keys[:, :, self.end : end].float().cpu().numpy()
        if self.indexes is None:
            self.indexes = []
            for row in range(b):
                heads = []
                for h in range(kv_heads):
                    train = new[row, h] if self.queries is None else self.queries[row, h].numpy()
                    heads.append(self._new_index(np.ascontiguousarray(train), d))
                self.indexes.append(heads)
            self.queries = None  # the centroids are trained: the sample is no longer needed
        for row in range(b):
            for h in range(kv_heads):
                self.indexes[row][h].add(np.ascontiguousarray(new[row, h]))
        self.end = end

    def lists_to_probe(self, k: int, lists: int) -> int:
        """IVF lists a search for ``k`` keys scans: at least ``probe``, and enough that about
        ``scan * k`` keys are scanned (lists hold ``end - start`` keys, ``lists`` of them)."""
        mean_list = max(1.0, (self.end - self.start) / lists)
        return min(lists, max(self.probe, math.ceil(self.scan * k / mean_list)))

    def search(self, rotated: Tensor, k: int) -> Tensor:
        """Entries ``[b, Hq, k]`` of the ``k`` highest ``q . key`` per query head (``-1``: none);
        :attr:`scanned` counts the keys the search compared with a query."""
        faiss = _faiss()
        b, hq, _, d = rotated.shape
        kv_heads = len(self.indexes[0])
        queries = rotated.float().cpu().reshape(b, kv_heads, hq // kv_heads, d).numpy()
        found = np.empty((b, kv_heads, hq // kv_heads, k), dtype=np.int64)
        stats = faiss.cvar.indexIVF_stats
        self.scanned = 0
        for row in range(b):
            for h in range(kv_heads):
                index, x = self.indexes[row][h], np.ascontiguousarray(queries[row, h])
                if self.kind == "flat":
                    _, ids = index.search(x, k)
                    self.scanned += index.ntotal * x.shape[0]
                else:
                    stats.reset()
                    params = faiss.SearchParametersIVF(nprobe=self.lists_to_probe(k, index.nlist))
                    _, ids = index.search(x, k, params=params)
                    self.scanned += stats.ndis
                found[row, h] = ids
        found = torch.from_numpy(found).reshape(b, hq, k)
        return torch.where(found >= 0, found + self.start, found).to(rotated.device)

    # -- the SideIndex contract -------------------------------------------------------------
    def nbytes(self) -> int:
        total = 0 if self.queries is None else self.queries.numel() * self.queries.element_size()
        if self.indexes is not None:
            faiss = _faiss()
            total += sum(len(faiss.serialize_index(ix)) for row in self.indexes for ix in row)
        return total

    def _forget_keys(self) -> None:
        """Entries were renumbered or dropped: empty the lists (training is kept), re-add later."""
        if self.indexes is not None:
            for row in self.indexes:
                for ix in row:
                    ix.reset()
        self.end = self.start

    def _remove_from(self, end: int) -> None:
        """Drop entries ``end, end + 1, ...`` (the newest local ids) from every index."""
        selector = _faiss().IDSelectorRange(max(0, end - self.start), self.end - self.start)
        for row in self.indexes:
            for ix in row:
                ix.remove_ids(selector)
        self.end = max(end, self.start)

    def on_select(self, keep: Tensor) -> None:
        self._forget_keys()

    def truncate(self, num_entries: int) -> None:
        if num_entries < self.end:
            self._remove_from(num_entries)

    def __deepcopy__(self, memo: dict) -> "KeyIndex":
        clone = copy.copy(self)
        clone.queries = None if self.queries is None else self.queries.clone()
        if self.indexes is not None:
            faiss = _faiss()
            clone.indexes = [[faiss.clone_index(ix) for ix in row] for row in self.indexes]
        return clone


@register
@dataclass(frozen=True)
class RetrievalAttention(RetrieveMethod):
    name: ClassVar[str] = "retrieval_attention"
    paper: ClassVar[str] = "Liu et al., RetrievalAttention, arXiv:2409.10516"
    summary: ClassVar[str] = (
        "Sinks + recent exact, top-k keys per query head from a query-trained ANN index (faiss), "
        "merged by log-sum-exp."
    )
    needs_rotated_keys: ClassVar[bool] = True

    budget: Budget = param(0.02, "keys retrieved per step and query head (entries or share of the cache)")
    sink: int = param(128, "first entries attended exactly every step", min=0)
    recent: int = param(512, "last entries attended exactly every step", min=1)
    index: Literal["ivf", "flat"] = param(
        "ivf", "ivf: inverted lists on prefill-query centroids (approximate); flat: exact search"
    )
    lists: int = param(256, "IVF lists per KV head (capped at training points / 39)", min=1)
    probe: int = param(16, "IVF lists scanned per query at least", min=1)
    scan: float = param(
        4.0, "IVF keys scanned per key retrieved: lists probed = max(probe, scan x budget / mean list length)",
        min=1.0,
    )
    train_queries: int = param(
        4096, "prefill queries sampled per KV head to train the IVF centroids", min=1
    )

    def stored_index(self, layer: LayerKV) -> KeyIndex:
        index = layer.side.get(INDEX_KEY)
        if not isinstance(index, KeyIndex):
            index = layer.side[INDEX_KEY] = KeyIndex(
                self.index, self.lists, self.probe, self.train_queries, self.sink, self.scan
            )
        return index

    def observe(self, q: Tensor, ctx: LayerContext) -> None:
        """Sample the prefill's rotated queries (the IVF centroids are trained on them)."""
        if self.index == "ivf":
            rotated = ctx.rotary.rotate(q, ctx.positions)
            self.stored_index(ctx.layer).add_queries(rotated, ctx.layer.kv_heads)

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        layer = ctx.layer
        n = layer.num_entries
        k = resolve_budget(self.budget, n)
        middle_end = n - self.recent
        if self.sink + self.recent + k >= n:
            return None  # the two parts hold every entry: dense attention is the same
        index = self.stored_index(layer)
        q_pos = ctx.positions
        with _OneThread():
            index.update(layer.keys, middle_end)
            found = index.search(ctx.rotary.rotate(q, q_pos), min(k, middle_end - self.sink))
        parts = [self.static_part(q, ctx, middle_end), retrieved_part(q, ctx, found)]
        return merge_partials(parts).to(q.dtype)

    def static_part(self, q: Tensor, ctx: LayerContext, middle_end: int) -> tuple[Tensor, Tensor]:
        """Partial attention over the first ``sink`` and the entries from ``middle_end`` on."""
        layer = ctx.layer
        device = q.device
        entries = torch.cat([
            torch.arange(self.sink, device=device),
            torch.arange(middle_end, layer.num_entries, device=device),
        ])
        keys, values = layer.keys.index_select(2, entries), layer.values.index_select(2, entries)
        k_pos = layer.key_positions().index_select(-1, entries)
        logits = ctx.position.logits(q, ctx.positions, keys, k_pos, ctx.rotary, ctx.scaling)
        return partial_attention(logits, values)


def retrieved_part(q: Tensor, ctx: LayerContext, found: Tensor) -> tuple[Tensor, Tensor]:
    """Partial attention of each query head over its own entries ``found`` ``[b, Hq, k]``
    (``-1`` entries are left out): each KV head gathers its query heads' entries once, each
    query head reads its own of them."""
    layer = ctx.layer
    union, read = kv_head_union(found, layer.kv_heads, layer.num_entries)
    shape = (*union.shape, layer.keys.shape[-1])
    keys = gather_entries(layer.keys, union, out=ctx.buffer("retrieval_attention.keys", shape, layer.keys))
    values = gather_entries(layer.values, union, out=ctx.buffer("retrieval_attention.values", shape, layer.values))
    logits = ctx.position.logits(q, ctx.positions, keys, layer.entry_positions(union), ctx.rotary, ctx.scaling)
    logits = logits.masked_fill(~read[:, :, None, :], float("-inf"))
    return partial_attention(logits, values)

