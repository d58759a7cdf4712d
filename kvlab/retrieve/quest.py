"""Quest: query-aware page selection during decoding.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024,
arXiv:2406.10774. The cache is split into pages of ``page`` entries; each page stores the
element-wise minimum ``m`` and maximum ``M`` of its post-RoPE keys. For a query ``q`` the page
score ``sum_i max(q_i M_i, q_i m_i)`` is an upper bound of ``q . k`` over the page; each query
head attends exactly to its ``max(3, budget / page)`` best pages. The first ``dense_layers``
layers and the prefill stay dense, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.engine.cache import LayerKV
from kvlab.registry import Budget, param, register, resolve_budget
from kvlab.retrieve.base import RetrieveMethod, gather_per_query_head

INDEX_KEY = "quest.page_bounds"


class PageBounds:
    """Element-wise min and max of the keys of every complete page: ``[b, kv_heads, P, d]``.

    Grows as pages fill; the partial last page is bounded on the fly and not stored.
    """

    def __init__(self, page: int) -> None:
        self.page = page
        self.mins: Tensor | None = None
        self.maxs: Tensor | None = None

    @property
    def pages(self) -> int:
        return 0 if self.mins is None else self.mins.shape[2]

    def update(self, keys: Tensor) -> None:
        """Bound the complete pages of ``keys`` ``[b, kv_heads, n, d]`` not yet bounded."""
        complete = keys.shape[2] // self.page
        if complete <= self.pages:
            return
        start = self.pages * self.page
        mins, maxs = page_min_max(keys[:, :, start : complete * self.page], self.page)
        if self.mins is None:
            self.mins, self.maxs = mins, maxs
        else:
            self.mins = torch.cat([self.mins, mins], dim=2)
            self.maxs = torch.cat([self.maxs, maxs], dim=2)

    def nbytes(self) -> int:
        if self.mins is None:
            return 0
        return 2 * self.mins.numel() * self.mins.element_size()

    def on_select(self, keep: Tensor) -> None:
        self.mins = self.maxs = None  # pages are regrouped: bound them again

    def truncate(self, num_entries: int) -> None:
        keep = num_entries // self.page
        if self.mins is not None:
            self.mins = self.mins[:, :, :keep].clone()
            self.maxs = self.maxs[:, :, :keep].clone()


def page_min_max(keys: Tensor, page: int) -> tuple[Tensor, Tensor]:
    """Min and max ``[b, heads, ceil(n / page), d]`` of each page of ``keys`` ``[b, heads, n, d]``."""
    b, h, n, d = keys.shape
    pages = -(-n // page)
    if pages * page != n:  # a partial last page: bound only its real entries
        full_mins, full_maxs = page_min_max(keys[:, :, : (pages - 1) * page], page)
        tail = keys[:, :, (pages - 1) * page :]
        mins = torch.cat([full_mins, tail.amin(dim=2, keepdim=True)], dim=2)
        maxs = torch.cat([full_maxs, tail.amax(dim=2, keepdim=True)], dim=2)
        return mins, maxs
    grouped = keys.reshape(b, h, pages, page, d)
    return grouped.amin(dim=3), grouped.amax(dim=3)


def page_scores(q: Tensor, mins: Tensor, maxs: Tensor) -> Tensor:
    """Upper bounds ``[b, Hq, P]`` of ``q . k`` per page for rotated ``q`` ``[b, Hq, 1, d]``
    and page bounds ``[b, Hkv, P, d]`` (each query head uses its KV head's bounds)."""
    b, hq, _, d = q.shape
    kv_heads = mins.shape[1]
    grouped = q.reshape(b, kv_heads, hq // kv_heads, 1, d)
    scores = torch.maximum(grouped * maxs[:, :, None], grouped * mins[:, :, None]).sum(dim=-1)
    return scores.reshape(b, hq, -1)


@register
@dataclass(frozen=True)
class Quest(RetrieveMethod):
    name: ClassVar[str] = "quest"
    paper: ClassVar[str] = "Tang et al., Quest, ICML 2024, arXiv:2406.10774"
    summary: ClassVar[str] = "Per-head top pages by key min/max bounds; exact attention on them."
    needs_rotated_keys: ClassVar[bool] = True

    budget: Budget = param(1024, "entries read per step and query head (pages x page size)")
    page: int = param(16, "entries per page", min=1, max=1024)
    dense_layers: int = param(2, "first layers that stay dense", min=0)

    def stored_bounds(self, layer: LayerKV) -> PageBounds:
        """The layer's index of complete pages, brought up to date."""
        index = layer.side.get(INDEX_KEY)
        if not isinstance(index, PageBounds) or index.page != self.page:
            index = layer.side[INDEX_KEY] = PageBounds(self.page)
        index.update(layer.keys)
        return index

    def scores(self, q_rotated: Tensor, layer: LayerKV) -> Tensor:
        """Page scores ``[b, Hq, ceil(n / page)]``: stored pages, then the partial last page
        (bounded on the fly, so no bound tensor is copied per step)."""
        index = self.stored_bounds(layer)
        parts = [] if index.mins is None else [page_scores(q_rotated, index.mins, index.maxs)]
        tail_start = index.pages * self.page
        if tail_start < layer.num_entries:
            tail_min, tail_max = page_min_max(layer.keys[:, :, tail_start:], self.page)
            parts.append(page_scores(q_rotated, tail_min, tail_max))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        layer = ctx.layer
        n = layer.num_entries
        pages = max(3, resolve_budget(self.budget, n) // self.page)
        if ctx.index < self.dense_layers or pages * self.page >= n:
            return None
        q_pos = ctx.positions
        chosen = self.scores(ctx.rotary.rotate(q, q_pos), layer).topk(pages, dim=-1).indices
        entries = (chosen[..., None] * self.page + torch.arange(self.page, device=q.device))
        entries = entries.flatten(-2)  # [b, Hq, pages * page]
        valid = entries < n
        entries = entries.clamp(max=n - 1)
        keys, values, k_pos = gather_per_query_head(layer, entries)
        return ctx.attend(q, q_pos, keys, k_pos, values, valid[:, :, None, :])
