"""A2ATS (training-free part): top-K tokens by attention scores approximated from
product-quantised keys under windowed RoPE; exact attention over them, sinks and the window.

He et al., "A2ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding
and Query-Aware Vector Quantization", Findings of ACL 2025, arXiv:2502.12665.

At the end of the context prefill, per layer and KV head: the entries outside the first
``sink`` and the last ``window`` go to the offloaded tier (keys and values,
:mod:`kvlab.retrieve.offload`); their *pre-RoPE* keys are product-quantised: cut in
``subspaces`` sub-vectors, each sub-space gets a k-means codebook of ``codewords`` centroids
(``iterations`` Lloyd steps on those keys), each key is stored as one code per sub-space.

Windowed RoPE (WRoPE): every key outside the window is at least ``window`` positions before
the query, and for scoring its relative position is taken as exactly ``window``: the score of
key ``k`` is ``(R_window q) . k`` with ``k`` before RoPE, which no longer depends on the key's
position, so one codebook serves all positions. Each step, per query head, the score of a key
is the sum over sub-spaces of a look-up table ``(R_window q)_s . C_s[code_s]``; the
probabilities ``softmax(score * scaling)`` are summed over the query heads of a KV head and its
top ``budget`` entries are fetched; attention is exact (true RoPE) over them, the sinks, the
window and every entry appended after the prefill.

Left out, and why: the paper's *query-aware* vector quantisation trains the codebooks to
minimise the error of ``q . k`` under the distribution of queries (a calibration/training
objective weighted by queries); here the codebooks are plain k-means on the keys, fitted at the
prefill's end (training-free). Its heterogeneous CPU/GPU kernels and the overlap of transfers
are left out too. ``budget`` counts the fetched entries per step and KV head; sinks and window
come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.errors import RecipeError
from kvlab.registry import Budget, param, register, resolve_budget
from kvlab.retrieve import offload
from kvlab.retrieve.base import RetrieveMethod

INDEX_KEY = "a2ats.codes"


def kmeans(x: Tensor, k: int, iterations: int) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means, batched: ``x`` ``[g, n, e]`` -> centroids ``[g, k, e]`` and the code
    ``[g, n]`` of each point (its nearest centroid). Starts from ``k`` evenly spaced points;
    a centroid left without points keeps its place."""
    n = x.shape[1]
    start = torch.linspace(0, n - 1, k, device=x.device).round().long()
    centroids = x[:, start].clone()
    codes = nearest(x, centroids)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).scatter_add_(1, codes[..., None].expand_as(x), x)
        counts = torch.zeros(centroids.shape[:2], device=x.device).scatter_add_(
            1, codes, torch.ones_like(codes, dtype=torch.float)
        )
        filled = counts > 0
        centroids = torch.where(filled[..., None], sums / counts.clamp(min=1)[..., None], centroids)
        codes = nearest(x, centroids)
    return centroids, codes


def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index ``[g, n]`` of the centroid ``[g, k, e]`` nearest to each point of ``x`` ``[g, n, e]``."""
    distances = (centroids * centroids).sum(-1)[:, None] - 2 * torch.bmm(x, centroids.transpose(1, 2))
    return distances.argmin(dim=-1)


class QuantisedKeys:
    """A2ATS's index of the offloaded entries (``m`` per KV head).

    Accelerator: ``codes`` ``[b, kv_heads, m, S]`` (uint8), ``codebooks``
    ``[b, kv_heads, S, C, d / S]``, ``positions`` ``[b, kv_heads, m]``.
    Offloaded tier: ``keys`` and ``values`` ``[b, kv_heads, m, d]`` (stored format).
    """

    def __init__(self, codes, codebooks, positions, keys, values):
        self.codes, self.codebooks, self.positions = codes, codebooks, positions
        self.keys, self.values = keys, values
        self.exact_entries = 0

    @property
    def entries(self) -> int:
        return self.codes.shape[2]

    @property
    def offloaded_entries(self) -> int:
        """Context entries held here only (see :meth:`LayerKV.head_entries`)."""
        return self.entries

    def nbytes(self) -> int:
        return offload.nbytes(self.codes, self.codebooks, self.positions)

    def offloaded_nbytes(self) -> int:
        return offload.nbytes(self.keys, self.values)

    def truncate(self, num_entries: int) -> None:
        if num_entries < self.exact_entries:
            raise RuntimeError("A2ATS: the context's exact entries cannot be truncated")

    def on_select(self, keep: Tensor) -> None:
        raise RuntimeError("A2ATS: entries cannot be evicted after its index is built")


def approximate_scores(q_window: Tensor, index: QuantisedKeys) -> Tensor:
    """``[b, Hq, m]``: ``sum_s q_s . C_s[code_s]`` for queries ``q_window`` ``[b, Hq, 1, d]``
    (rotated by the window): one look-up table per query head and sub-space."""
    b, hq, _, d = q_window.shape
    _, kv_heads, subspaces, codewords, width = index.codebooks.shape
    group = hq // kv_heads
    m = index.codes.shape[2]
    q_sub = q_window.reshape(b, kv_heads, group, subspaces, 1, width).to(index.codebooks.dtype)
    table = (q_sub * index.codebooks[:, :, None]).sum(-1)  # [b, kv, g, S, C]
    # one bag of S rows per key: row (b, kv, s, code_s) of the tables, summed (embedding_bag),
    # all KV heads at once; no [.., g]-expanded index, no [g, m, S] temporary
    rows = table.permute(0, 1, 3, 4, 2).reshape(-1, group)  # [b * kv * S * C, g]
    offsets = (torch.arange(b * kv_heads, device=q_window.device, dtype=torch.int32)[:, None] * subspaces
               + torch.arange(subspaces, device=q_window.device, dtype=torch.int32)) * codewords
    bags = index.codes.reshape(b * kv_heads, m, subspaces).int() + offsets[:, None]  # [b * kv, m, S]
    scores = torch.nn.functional.embedding_bag(bags.reshape(-1, subspaces), rows, mode="sum")
    return scores.reshape(b, kv_heads, m, group).transpose(2, 3).reshape(b, hq, m)


@register
@dataclass(frozen=True)
class A2ATS(RetrieveMethod):
    name: ClassVar[str] = "a2ats"
    paper: ClassVar[str] = "He et al., A2ATS, Findings of ACL 2025, arXiv:2502.12665"
    summary: ClassVar[str] = (
        "Top-K by product-quantised pre-RoPE keys under windowed RoPE; exact attention on them."
    )

    budget: Budget = param(2048, "entries fetched per step and KV head (top-K)")
    sink: int = param(4, "first entries always read exactly", min=0)
    window: int = param(64, "last context entries read exactly; the WRoPE distance", min=1)
    subspaces: int = param(8, "sub-vectors per key (product quantisation)", min=1)
    codewords: int = param(256, "centroids per sub-space codebook", min=2, max=256)
    iterations: int = param(10, "k-means (Lloyd) iterations", min=0, max=100)

    def end_context(self, q: Tensor, ctx: LayerContext) -> None:
        layer = ctx.layer
        n = layer.num_entries
        b, kv_heads, _, d = layer.keys.shape
        if d % self.subspaces:
            raise RecipeError(f"a2ats(subspaces={self.subspaces}): must divide the head size {d}")
        middle = slice(self.sink, n - self.window)
        m = n - self.window - self.sink
        if m < 1:
            return  # nothing to retrieve: the layer stays whole and dense
        width = d // self.subspaces
        pre = offload.unrotated_keys(ctx)[:, :, middle].float()
        points = pre.reshape(b, kv_heads, m, self.subspaces, width).permute(0, 1, 3, 2, 4)
        codewords = min(self.codewords, m)
        centroids, codes = kmeans(points.reshape(-1, m, width), codewords, self.iterations)
        codebooks = centroids.reshape(b, kv_heads, self.subspaces, codewords, width)
        codes = codes.reshape(b, kv_heads, self.subspaces, m).transpose(2, 3)
        positions = offload.head_positions(layer)
        index = QuantisedKeys(
            codes.to(torch.uint8).contiguous(), codebooks.to(layer.keys.dtype).contiguous(),
            positions[:, :, middle].to(torch.int32).contiguous(),
            offload.to_offload_tier(layer.keys[:, :, middle]),
            offload.to_offload_tier(layer.values[:, :, middle]),
        )
        device = layer.keys.device
        exact = torch.cat([torch.arange(self.sink), torch.arange(n - self.window, n)]).to(device)
        layer.select(exact.expand(b, kv_heads, -1))
        index.exact_entries = layer.num_entries
        layer.side[INDEX_KEY] = index

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        index = ctx.layer.side.get(INDEX_KEY)
        if not isinstance(index, QuantisedKeys):
            return None
        top = resolve_budget(self.budget, index.entries + ctx.layer.num_entries)
        b, hq = q.shape[:2]
        kv_heads = index.codes.shape[1]
        if top >= index.entries:
            return self.attend_appended(q, ctx)
        window = torch.tensor([self.window], device=q.device)
        scores = approximate_scores(ctx.rotary.rotate(q, window), index).float() * ctx.scaling
        votes = scores.softmax(dim=-1).reshape(b, kv_heads, hq // kv_heads, -1).sum(dim=2)
        rows = votes.topk(top, dim=-1).indices
        return self.attend_rows(q, ctx, index, rows)

    def attend_appended(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Appended prompt tokens read every offloaded entry exactly (kvlab's choice: the paper
        prefills the whole prompt at once)."""
        index = ctx.layer.side.get(INDEX_KEY)
        if not isinstance(index, QuantisedKeys):
            return None
        b, kv_heads = index.codes.shape[:2]
        rows = torch.arange(index.entries, device=q.device).expand(b, kv_heads, -1)
        return self.attend_rows(q, ctx, index, rows)

    def attend_rows(self, q: Tensor, ctx: LayerContext, index: QuantisedKeys, rows: Tensor) -> Tensor:
        """Exact attention over the layer's entries and the offloaded ``rows`` ``[b, kv, k]``."""
        keys = offload.fetch(index.keys, rows)
        values = offload.fetch(index.values, rows)
        positions = index.positions.gather(-1, rows)
        return offload.attend_with(q, ctx, keys, positions, values)
