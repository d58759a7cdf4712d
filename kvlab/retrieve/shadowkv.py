"""ShadowKV: low-rank pre-RoPE keys on the accelerator, values offloaded, chunks by landmarks.

Sun et al., "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference",
ICML 2025, arXiv:2410.21465. At the end of the context prefill, per layer:

- the pre-RoPE keys, flattened over KV heads to ``[n, kv_heads * d]``, are factored by SVD and
  kept at rank ``rank`` as ``U`` ``[n, r]`` and ``S V^T`` ``[r, kv_heads * d]`` (the full keys are
  dropped: the layer's storage shrinks);
- the values go to the offloaded tier (:mod:`kvlab.retrieve.offload`);
- the post-RoPE keys are cut in chunks of ``chunk`` entries, a chunk's landmark is its mean;
  per KV head the ``outliers`` chunks with the lowest minimum cosine similarity between a key
  and its landmark stay whole (exact keys and values), as do the last ``local`` chunks (and
  the partial chunk after them).

Each decoding step, per KV head: chunk score ``softmax(q . landmark * scaling)`` over the
chunks, for each query head of the group, then the maximum over the group; the top
``budget / chunk`` chunks are rebuilt as ``U[idx] S V^T``, rotated at their original positions,
their values fetched from the offloaded tier; attention is exact over outliers + rebuilt
chunks + local chunks + every entry appended after the prefill.

``budget`` counts the rebuilt entries per step and KV head (outliers and local chunks come on
top, as in the paper). Left out: the paper's CUDA kernels and the overlap of value fetching
with key rebuilding (here the steps run one after the other); the value transfer is a gather
from host memory. The context's positions are read through the rotary of the prefill's end
(a drop-in position method whose frequencies change during the prefill is not undone exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register, resolve_budget
from kvlab.retrieve import offload
from kvlab.retrieve.base import RetrieveMethod

INDEX_KEY = "shadowkv.shadow"


class ShadowIndex:
    """What ShadowKV keeps of the context's non-exact chunks (``m`` = entries of those chunks).

    Accelerator: ``u`` ``[b, m, r]`` (rows of U), ``svt`` ``[b, kv_heads, r, d]`` (S V^T split by
    head), ``landmarks`` ``[b, kv_heads, M, d]`` and ``chunk_ids`` ``[b, kv_heads, M]`` of the
    selectable chunks (outliers excluded), ``positions`` ``[b, kv_heads, m]``.
    Offloaded tier: ``values`` ``[b, kv_heads, m, d]``.
    """

    def __init__(self, u, svt, landmarks, chunk_ids, positions, values, chunk: int, entries: int):
        self.u, self.svt, self.landmarks, self.chunk_ids = u, svt, landmarks, chunk_ids
        self.positions, self.values, self.chunk, self.entries = positions, values, chunk, entries
        self.exact_entries = 0  # entries of the layer's storage when the index was built
        self.offloaded_entries = 0  # context entries held here only (not outliers)

    def nbytes(self) -> int:
        return offload.nbytes(self.u, self.svt, self.landmarks, self.chunk_ids, self.positions)

    def offloaded_nbytes(self) -> int:
        return offload.nbytes(self.values)

    def truncate(self, num_entries: int) -> None:
        if num_entries < self.exact_entries:
            raise RuntimeError("ShadowKV: the context's exact entries cannot be truncated")

    def on_select(self, keep: Tensor) -> None:
        raise RuntimeError("ShadowKV: entries cannot be evicted after its index is built")


@register
@dataclass(frozen=True)
class ShadowKV(RetrieveMethod):
    name: ClassVar[str] = "shadowkv"
    paper: ClassVar[str] = "Sun et al., ShadowKV, ICML 2025, arXiv:2410.21465"
    summary: ClassVar[str] = (
        "Low-rank pre-RoPE keys + offloaded values; top chunks by landmarks rebuilt per step."
    )

    budget: Budget = param(2048, "entries rebuilt per step and KV head (chunks x chunk size)")
    rank: int = param(160, "SVD rank of the keys (clamped to what the key matrix has)", min=1)
    chunk: int = param(8, "entries per chunk (one landmark each)", min=1, max=1024)
    outliers: int = param(48, "chunks per KV head kept whole: lowest min cosine to the landmark", min=0)
    local: int = param(4, "last chunks of the context kept whole", min=0)

    def end_context(self, q: Tensor, ctx: LayerContext) -> None:
        layer = ctx.layer
        n, c = layer.num_entries, self.chunk
        chunks = n // c - self.local  # chunks that are not local
        if chunks - self.outliers < 1:
            return  # nothing to retrieve: the layer stays whole and dense
        b, kv_heads, _, d = layer.keys.shape
        region = chunks * c
        post = offload.rotated_keys(ctx)[:, :, :region].float()
        pre = offload.unrotated_keys(ctx).float()
        # the low-rank keys: SVD of [n, kv_heads * d] (all context keys), rank r
        flat = pre.transpose(1, 2).reshape(b, n, kv_heads * d)
        r = min(self.rank, n, kv_heads * d)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        u = u[:, :region, :r].to(layer.keys.dtype).contiguous()
        svt = (s[:, :r, None] * vh[:, :r]).reshape(b, r, kv_heads, d).transpose(1, 2)
        svt = svt.to(layer.keys.dtype).contiguous()
        # landmarks and outliers, per KV head
        grouped = post.reshape(b, kv_heads, chunks, c, d)
        landmarks = grouped.mean(dim=3)
        cosine = torch.nn.functional.cosine_similarity(grouped, landmarks[:, :, :, None], dim=-1)
        worst = cosine.amin(dim=-1)  # [b, kv_heads, chunks]
        order = worst.argsort(dim=-1)  # lowest first
        outlier_ids = order[..., : self.outliers].sort(dim=-1).values
        chunk_ids = order[..., self.outliers :].sort(dim=-1).values
        landmarks = offload.gather_rows(landmarks, chunk_ids).to(layer.keys.dtype)
        positions = offload.head_positions(layer)
        index = ShadowIndex(
            u, svt, landmarks, chunk_ids, positions[:, :, :region].to(torch.int32).contiguous(),
            offload.to_offload_tier(layer.values[:, :, :region]), c, region,
        )
        # the layer keeps only the outlier chunks and the local entries, exactly
        steps = torch.arange(c, device=layer.keys.device)
        outlier_rows = (outlier_ids[..., None] * c + steps).flatten(-2)
        local_rows = torch.arange(region, n, device=layer.keys.device).expand(b, kv_heads, -1)
        layer.select(torch.cat([outlier_rows, local_rows], dim=-1))
        index.exact_entries = layer.num_entries
        index.offloaded_entries = region - self.outliers * c
        layer.side[INDEX_KEY] = index

    def chunk_scores(self, q_rotated: Tensor, index: ShadowIndex, scaling: float) -> Tensor:
        """``[b, kv_heads, M]``: per query head softmax of ``q . landmark * scaling`` over the
        selectable chunks, maximum over the query heads of each KV head's group."""
        b, hq, _, d = q_rotated.shape
        kv_heads = index.landmarks.shape[1]
        grouped = q_rotated.reshape(b, kv_heads, hq // kv_heads, d)
        logits = torch.matmul(grouped, index.landmarks.transpose(-1, -2)).float() * scaling
        return logits.softmax(dim=-1).amax(dim=2)

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        index = ctx.layer.side.get(INDEX_KEY)
        if not isinstance(index, ShadowIndex):
            return None
        total = index.entries + ctx.layer.num_entries
        picked = max(1, resolve_budget(self.budget, total) // self.chunk)
        selectable = index.chunk_ids.shape[-1]
        if picked >= selectable:
            chosen = index.chunk_ids
        else:
            scores = self.chunk_scores(ctx.rotary.rotate(q, ctx.positions), index, ctx.scaling)
            chosen = index.chunk_ids.gather(-1, scores.topk(picked, dim=-1).indices)
        return self.attend_chunks(q, ctx, index, chosen)

    def attend_appended(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Appended prompt tokens read every context chunk (rebuilt keys): kvlab's choice,
        the paper prefills the whole prompt at once."""
        index = ctx.layer.side.get(INDEX_KEY)
        if not isinstance(index, ShadowIndex):
            return None
        return self.attend_chunks(q, ctx, index, index.chunk_ids)

    def attend_chunks(self, q: Tensor, ctx: LayerContext, index: ShadowIndex, chosen: Tensor) -> Tensor:
        """Exact attention over the layer's entries and the chunks ``chosen`` ``[b, kv_heads,
        k]``, their keys rebuilt from the low-rank factors and values fetched."""
        steps = torch.arange(self.chunk, device=q.device)
        rows = (chosen[..., None] * self.chunk + steps).flatten(-2)  # [b, kv_heads, k]
        keys = torch.matmul(offload.gather_rows(index.u[:, None], rows), index.svt)  # U[idx] S V^T, per head
        positions = index.positions.gather(-1, rows)
        keys = offload.as_stored(ctx, keys, positions)
        values = offload.fetch(index.values, rows)
        return offload.attend_with(q, ctx, keys, positions, values)
