"""The retrieve stage: the cache is kept whole, each decoding step reads a subset of it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.cache import LayerKV
from kvlab.engine.context import LayerContext
from kvlab.engine.kernels import gather_entries
from kvlab.registry import Method


@dataclass(frozen=True)
class RetrieveMethod(Method, ABC):
    """Base of retrieve methods, asked at every decoding step (one query token) and, in a
    recipe without a prefill method, at every prompt forward (:meth:`attend_prefill`)."""

    stage: ClassVar[str] = "retrieve"
    needs_rotated_keys: ClassVar[bool] = False
    """True when selection scores the stored keys as rotated (post-RoPE) vectors."""

    def end_context(self, q: Tensor, ctx: LayerContext) -> None:
        """Called in every layer at the end of the context prefill, after compression and
        conversion, with the forward's last queries ``q`` ``[b, Hq, t, d]``: build an index over
        the context (ShadowKV's low-rank keys, A2ATS's codes). By default nothing."""

    def attend_appended(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Attention ``[b, Hq, t, d]`` of prompt tokens appended after the context (a session's
        question), or None for dense attention over the layer's storage. A method whose index
        moved context entries out of the storage (ShadowKV, A2ATS) attends over them here."""
        return None

    def attend_prefill(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Attention ``[b, Hq, t, d]`` of a prompt forward's unrotated queries ``q`` ``[b, Hq,
        t, d]`` (a chunk of the context prefill, or prompt tokens appended after the context
        that :meth:`attend_appended` left dense; their keys are stored, the layer's last ``t``
        entries), or None for dense attention. Asked only in a recipe without a prefill
        method: the prefill stage owns the prompt's attention, and a retrieve method that also
        selects in chunked prefill (TokenSelect) does it in its place. By default None."""
        return None

    @abstractmethod
    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Attention ``[b, Hq, 1, d]`` over the entries selected for the unrotated query
        ``q`` ``[b, Hq, 1, d]``, or None to attend densely."""

    def observe(self, q: Tensor, ctx: LayerContext) -> None:
        """Called in every layer after the attention of each chunk of the context prefill
        (``q`` ``[b, Hq, t, d]`` its unrotated queries): a method whose index is built from
        the prefill's queries (RetrievalAttention) samples them here; by default nothing."""


def kv_head_union(entries: Tensor, kv_heads: int, n: int) -> tuple[Tensor, Tensor]:
    """What each KV head gathers once for the entries ``entries`` ``[b, Hq, k]`` its query
    heads selected (``-1``: none), and which of it each query head reads: ``(union [b, Hk, U],
    read [b, Hq, U])``. ``union`` holds each entry any query head of the group selected once
    (ascending, then padding: a valid entry index that no head reads); ``U`` is the largest
    union over the KV heads (one host sync, as on a CPU the search that selected is one)."""
    b, hq, k = entries.shape
    group = hq // kv_heads
    ids = torch.where(entries >= 0, entries, n)  # n: "none", sorted last
    grouped = ids.reshape(b, kv_heads, group * k).sort(dim=-1).values
    repeat = torch.zeros_like(grouped, dtype=torch.bool)
    repeat[..., 1:] = grouped[..., 1:] == grouped[..., :-1]
    repeat |= grouped == n
    order = repeat.to(torch.int8).sort(dim=-1, stable=True).indices  # the union first, ascending
    grouped, repeat = grouped.gather(-1, order), repeat.gather(-1, order)
    width = max(1, int((~repeat).sum(-1).max()))
    union, real = grouped[..., :width].clamp(max=n - 1), ~repeat[..., :width]
    chose = torch.zeros(b, hq, n + 1, dtype=torch.bool, device=entries.device)
    chose.scatter_(-1, ids, True)  # [b, Hq, n + 1]: what each query head selected
    mine = chose.view(b, kv_heads, group, n + 1).gather(-1, union[:, :, None].expand(-1, -1, group, -1))
    return union, (mine & real[:, :, None]).reshape(b, hq, width)


def gather_per_query_head(layer: LayerKV, entries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keys and values ``[b, Hq, k, d]`` and positions ``[b, Hq, k]`` of the entries
    ``entries`` ``[b, Hq, k]`` each query head selected (from its KV head's entries)."""
    b, hq, k = entries.shape
    kv_heads = layer.kv_heads
    keys, values = gather_entries(layer.keys, entries), gather_entries(layer.values, entries)
    k_pos = layer.key_positions()
    if k_pos.dim() == 1:
        return keys, values, k_pos[entries]
    by_kv_head = entries.reshape(b, kv_heads, (hq // kv_heads) * k)
    return keys, values, k_pos.gather(2, by_kv_head).reshape(b, hq, k)
