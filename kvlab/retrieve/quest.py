"""Quest: query-aware page selection during decoding.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024,
arXiv:2406.10774. The cache is split into pages of ``page`` entries; each page stores the
element-wise minimum ``m`` and maximum ``M`` of its post-RoPE keys. For a query ``q`` the page
score ``sum_i max(q_i M_i, q_i m_i)`` is an upper bound of ``q . k`` over the page; each query
head attends exactly to its ``max(3, budget / page)`` best pages. The first ``dense_layers``
layers and the prefill stay dense, as in the paper.

``sink`` / ``recent`` (default 0: the published method) also read the first and the last
entries whatever their pages score, the remedy of TokenSelect and RetrievalAttention: on the
default model a head that misses the attention-sink page loses most of its mass
(benchmarks/results/quest_fidelity.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.engine.cache import LayerKV
from kvlab.registry import Budget, param, register, resolve_budget
from kvlab.retrieve.base import RetrieveMethod

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
    and page bounds ``[b, Hkv, P, d]`` (each query head uses its KV head's bounds).

    ``sum_i max(q_i M_i, q_i m_i)`` is ``q+ . M + q- . m`` (``q+``/``q-`` the positive and
    negative parts of ``q``; ``m <= M``): two matrix products, no ``[Hq, P, d]`` temporaries."""
    b, hq, _, d = q.shape
    kv_heads = mins.shape[1]
    grouped = q.reshape(b, kv_heads, hq // kv_heads, d).to(mins.dtype)
    scores = grouped.clamp(min=0) @ maxs.transpose(-1, -2) + grouped.clamp(max=0) @ mins.transpose(-1, -2)
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
    sink: int = param(0, "first entries always read besides the pages (0: as published)", min=0)
    recent: int = param(0, "last entries always read besides the pages (0: as published)", min=0)

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
            tail = layer.keys[:, :, tail_start:]
            tail_min, tail_max = tail.amin(dim=2, keepdim=True), tail.amax(dim=2, keepdim=True)
            parts.append(page_scores(q_rotated, tail_min, tail_max))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def select(self, q: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor] | None:
        """Entries ``[b, Hq, k]`` each query head reads this step and which of them count
        (``[b, Hq, k]`` bool: past the end or read twice do not); None for dense attention.

        The top ``max(3, budget // page)`` pages by score of the query rotated at its
        position, then, when ``sink`` / ``recent`` are set, the first ``sink`` and the last
        ``recent`` entries the pages do not already hold. Laid out for a cheap gather: the
        chosen complete pages (one chosen partial page stands as an unread block), then the
        partial page's entries (read by the heads that chose it), then sink and recent."""
        layer = ctx.layer
        n = layer.num_entries
        pages = max(3, resolve_budget(self.budget, n) // self.page)
        if ctx.index < self.dense_layers or pages * self.page >= n:
            return None
        q_rotated = ctx.rotary.rotate(q, ctx.positions)
        chosen = self.scores(q_rotated, layer).topk(pages, dim=-1, sorted=False).indices
        complete = n // self.page
        offsets = torch.arange(self.page, device=q.device)
        blocks = chosen.clamp(max=complete - 1)
        entries = (blocks[..., None] * self.page + offsets).flatten(-2)  # [b, Hq, pages * page]
        valid = (chosen < complete).repeat_interleave(self.page, dim=-1)
        parts, flags = [entries], [valid]
        if complete * self.page < n:
            tail = torch.arange(complete * self.page, n, device=q.device)
            parts.append(tail.expand(*chosen.shape[:2], -1))
            flags.append((chosen == complete).any(dim=-1, keepdim=True).expand(-1, -1, tail.numel()))
        fixed = [torch.arange(min(self.sink, n), device=q.device)]
        if self.recent:
            fixed.append(torch.arange(max(n - self.recent, self.sink), n, device=q.device))
        fixed = torch.cat(fixed)
        if fixed.numel():
            in_chosen = (chosen[..., None, :] == (fixed // self.page)[:, None]).any(dim=-1)
            parts.append(fixed.expand(*chosen.shape[:2], -1))
            flags.append(~in_chosen)
        return torch.cat(parts, dim=-1), torch.cat(flags, dim=-1)

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        selection = self.select(q, ctx)
        if selection is None:
            return None
        entries, valid = selection
        layer = ctx.layer
        n, kv_heads = layer.num_entries, layer.kv_heads
        b, hq, _ = entries.shape
        paged = max(3, resolve_budget(self.budget, n) // self.page) * self.page
        block_ids = entries[..., :paged:self.page] // self.page  # [b, Hq, pages]
        rest = entries[0, 0, paged:]  # the same for every head: partial page, sink, recent
        keys = read_rows(layer.keys, block_ids, self.page, rest)
        values = read_rows(layer.values, block_ids, self.page, rest)
        k_pos = layer.key_positions()
        if k_pos.dim() == 1:
            k_pos = k_pos[entries]
        else:
            head = (torch.arange(hq, device=q.device) // (hq // kv_heads))[None, :, None]
            k_pos = k_pos[torch.arange(b, device=q.device)[:, None, None], head, entries]
        return ctx.attend(q, ctx.positions, keys, k_pos, values, valid[:, :, None, :])


def read_rows(x: Tensor, block_ids: Tensor, page: int, rest: Tensor) -> Tensor:
    """``[b, Hq, pages * page + r, d]``: for each query head, the pages ``block_ids``
    ``[b, Hq, pages]`` of its KV head's ``x`` ``[b, Hkv, n, d]`` copied as whole blocks (one
    ``index_select`` per KV head over a paged view), then the entries ``rest`` ``[r]``."""
    b, kv_heads, n, d = x.shape
    hq, pages = block_ids.shape[1:]
    group = hq // kv_heads
    view = x[:, :, : (n // page) * page].unflatten(2, (n // page, page)).flatten(3)
    ids = block_ids.reshape(b, kv_heads, group * pages)
    out = x.new_empty(b, hq, pages * page + rest.numel(), d)  # written once, no stack or cat
    for i in range(b):
        for h in range(kv_heads):
            heads = out[i, h * group : (h + 1) * group, : pages * page]
            heads.view(group, pages, page * d).copy_(view[i, h].index_select(0, ids[i, h]).view(group, pages, page * d))
    if rest.numel():
        out[:, :, pages * page :] = x.index_select(2, rest).repeat_interleave(group, dim=1)
    return out
