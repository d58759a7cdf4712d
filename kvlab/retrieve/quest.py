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
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.engine.cache import LayerKV
from kvlab.engine.kernels import gather_entries
from kvlab.registry import Budget, param, register, resolve_budget
from kvlab.retrieve.base import RetrieveMethod

INDEX_KEY = "quest.page_bounds"


class PageBounds:
    """Element-wise min and max of the keys of every page, the partial last page included:
    ``[b, kv_heads, P, d]`` views (:meth:`bounds`) of buffers that may hold a few pages more.

    Built at the end of the context prefill (:meth:`Quest.end_context`, as the paper's prefill
    does) and kept up to date per appended token: a new token folds into its page's bounds
    (an element-wise min/max with the page's slot, in place), so a decoding step never
    re-reads a page's keys. Like the cache's storage, the buffers grow by a small reserve while
    decoding (``min(32, P // 16)`` pages, none for a prompt chunk); reserved slots count in
    :meth:`nbytes`.
    """

    def __init__(self, page: int) -> None:
        self.page = page
        self.mins: Tensor | None = None
        self.maxs: Tensor | None = None
        self.entries = 0  # entries bounded: pages 0 .. ceil(entries / page) - 1 hold them

    @property
    def pages(self) -> int:
        """Pages bounded, the partial last one included."""
        return -(-self.entries // self.page)

    def bounds(self) -> tuple[Tensor, Tensor]:
        """Min and max ``[b, kv_heads, pages, d]`` of every bounded page."""
        return self.mins[:, :, : self.pages], self.maxs[:, :, : self.pages]

    def update(self, keys: Tensor) -> None:
        """Bound the entries of ``keys`` ``[b, kv_heads, n, d]`` not yet bounded: the rest of
        the partial page by an in-place min/max, then the pages after it."""
        n = keys.shape[2]
        if n < self.entries:  # entries dropped without truncate(): bound them again
            self.truncate(n)
        start = self.entries
        if start == n:
            return
        if start % self.page:
            slot, stop = start // self.page, min(n, start - start % self.page + self.page)
            new = keys[:, :, start:stop]
            torch.minimum(self.mins[:, :, slot], new.amin(dim=2), out=self.mins[:, :, slot])
            torch.maximum(self.maxs[:, :, slot], new.amax(dim=2), out=self.maxs[:, :, slot])
            start = stop
        if start < n:
            mins, maxs = page_min_max(keys[:, :, start:n], self.page)
            self._write(start // self.page, mins, maxs, decoding=n - self.entries == 1)
        self.entries = n

    def _write(self, slot: int, mins: Tensor, maxs: Tensor, decoding: bool) -> None:
        """Write page bounds ``[b, h, m, d]`` at pages ``slot ..``, growing the buffers."""
        end = slot + mins.shape[2]
        if self.mins is None or self.mins.shape[2] < end:
            reserve = min(32, end // 16) if decoding else 0
            shape = (*mins.shape[:2], end + reserve, mins.shape[3])
            grown_min, grown_max = mins.new_empty(shape), maxs.new_empty(shape)
            if self.mins is not None and slot:
                grown_min[:, :, :slot] = self.mins[:, :, :slot]
                grown_max[:, :, :slot] = self.maxs[:, :, :slot]
            self.mins, self.maxs = grown_min, grown_max
        self.mins[:, :, slot:end] = mins
        self.maxs[:, :, slot:end] = maxs

    def nbytes(self) -> int:
        if self.mins is None:
            return 0
        return 2 * self.mins.numel() * self.mins.element_size()

    def on_select(self, keep: Tensor) -> None:
        self.mins = self.maxs = None  # pages are regrouped: bound them again
        self.entries = 0

    def truncate(self, num_entries: int) -> None:
        """Keep the complete pages below ``num_entries``; the partial page after them is bounded
        again from the keys at the next :meth:`update`."""
        self.entries = min(self.entries, num_entries - num_entries % self.page)


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
        """The layer's page bounds, brought up to date."""
        index = layer.side.get(INDEX_KEY)
        if not isinstance(index, PageBounds) or index.page != self.page:
            index = layer.side[INDEX_KEY] = PageBounds(self.page)
        index.update(layer.keys)
        return index

    def scores(self, q_rotated: Tensor, layer: LayerKV) -> Tensor:
        """Page scores ``[b, Hq, ceil(n / page)]``, the partial last page last (its bounds
        kept up to date per token by :class:`PageBounds`)."""
        return page_scores(q_rotated, *self.stored_bounds(layer).bounds())

    def end_context(self, q: Tensor, ctx: LayerContext) -> None:
        """Bound every page of the finished context in each layer that will select (the
        prefill's work in the paper), so the first decoding step does not pay for it."""
        n = ctx.layer.num_entries
        if ctx.index >= self.dense_layers and max(3, resolve_budget(self.budget, n) // self.page) * self.page < n:
            self.stored_bounds(ctx.layer)

    def select(self, q: Tensor, ctx: LayerContext) -> PageSelection | None:
        """What each KV head gathers this step and which of it each query head reads
        (:class:`PageSelection`), or None for dense attention.

        Each query head chooses its top ``max(3, budget // page)`` pages by score of the query
        rotated at its position, then, when ``sink`` / ``recent`` are set, the first ``sink``
        and the last ``recent`` entries its pages do not already hold. A KV head gathers the
        union of its query heads' complete pages once (the heads of a GQA group choose about
        half of their pages alike on the default model: benchmarks/README.md, "Time vs length"),
        as runs of ``page`` entries, then the runs that cover the partial page's entries (read
        by the query heads that chose it) and the sink and recent entries; each query head
        reads only its own pages of them."""
        layer = ctx.layer
        n = layer.num_entries
        pages = max(3, resolve_budget(self.budget, n) // self.page)
        if ctx.index < self.dense_layers or pages * self.page >= n:
            return None
        q_rotated = ctx.rotary.rotate(q, ctx.positions)
        chosen = self.scores(q_rotated, layer).topk(pages, dim=-1, sorted=False).indices  # [b, Hq, P]
        b, hq, _ = chosen.shape
        kv_heads, complete = layer.kv_heads, n // self.page
        union, first = group_union(chosen, kv_heads, complete)  # [b, Hk, U] pages, real slots
        group = hq // kv_heads
        marks = torch.zeros(b, hq, complete + 1, dtype=torch.bool, device=q.device)
        marks.scatter_(-1, chosen, True)  # [b, Hq, pages + partial]: what each head chose
        mine = marks.gather(-1, union.repeat_interleave(group, dim=1)).view(b, kv_heads, group, -1)
        read = (mine & first[:, :, None, :]).reshape(b, hq, -1)  # [b, Hq, U]
        starts = union * self.page
        valid = read.repeat_interleave(self.page, dim=-1)
        extra = ctx.scratch.get((INDEX_KEY, "extra", n))
        if extra is None:
            extra = ctx.scratch[(INDEX_KEY, "extra", n)] = self.extra_runs(n, q.device)
        if extra.starts.numel():
            chosen_page = (chosen[..., None, :] == (extra.entries // self.page)[:, None]).any(dim=-1)
            chose_partial = (chosen == complete).any(dim=-1, keepdim=True)
            extra_read = torch.where(extra.partial, extra.fixed | chose_partial, extra.fixed & ~chosen_page)
            starts = torch.cat([starts, extra.starts.expand(b, kv_heads, -1)], dim=-1)
            valid = torch.cat([valid, extra_read & extra.first], dim=-1)
        entries = (starts[..., None] + torch.arange(self.page, device=q.device)).flatten(-2)
        return PageSelection(starts, entries, valid)

    def extra_runs(self, n: int, device: torch.device) -> ExtraRuns:
        """Runs of ``page`` entries covering the partial last page and the sink and recent
        entries of an ``n``-entry layer (the same for every head and layer of a step)."""
        complete = n // self.page
        wanted = [(complete * self.page, n), (0, min(self.sink, n)), (max(n - self.recent, 0), n)]
        starts: list[int] = []
        for a, e in sorted((a, e) for a, e in wanted if a < e):
            s = a
            while s < e:
                if not any(t <= s < t + self.page for t in starts):
                    starts.append(min(s, n - self.page))  # a run never passes the last entry
                s += self.page
        entries = [t + i for t in starts for i in range(self.page)]
        seen: set[int] = set()
        first = []
        for e in entries:
            first.append(e not in seen)
            seen.add(e)
        as_tensor = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype, device=device)  # noqa: E731
        return ExtraRuns(
            starts=as_tensor(starts), entries=as_tensor(entries), first=as_tensor(first, torch.bool),
            fixed=as_tensor([e < self.sink or (self.recent > 0 and e >= n - self.recent)
                             for e in entries], torch.bool),
            partial=as_tensor([e >= complete * self.page for e in entries], torch.bool),
        )

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        selection = self.select(q, ctx)
        if selection is None:
            return None
        layer = ctx.layer
        b, kv_heads, runs = selection.starts.shape
        shape = (b, kv_heads, runs * self.page, layer.keys.shape[-1])
        keys = gather_entries(layer.keys, selection.starts, self.page,
                              out=ctx.buffer("quest.keys", shape, layer.keys))
        values = gather_entries(layer.values, selection.starts, self.page,
                                out=ctx.buffer("quest.values", shape, layer.values))
        k_pos = layer.entry_positions(selection.entries)
        return ctx.attend(q, ctx.positions, keys, k_pos, values, selection.valid[:, :, None, :])


def group_union(chosen: Tensor, kv_heads: int, complete: int) -> tuple[Tensor, Tensor]:
    """The complete pages any query head of each KV head's group chose, once each:
    ``(pages [b, Hk, U], real [b, Hk, U])`` from ``chosen`` ``[b, Hq, P]``. ``real`` is False
    on slots past a KV head's own union (``U`` is the largest union over the KV heads) and on
    the partial page (index ``complete``; its entries are read by their own runs). On a CPU
    the slots are cut to ``U``; on an accelerator they stay ``group x P`` (finding ``U`` would
    be a host sync per layer and step)."""
    b, hq, pages = chosen.shape
    grouped = chosen.reshape(b, kv_heads, (hq // kv_heads) * pages).sort(dim=-1).values
    repeat = torch.zeros_like(grouped, dtype=torch.bool)
    repeat[..., 1:] = grouped[..., 1:] == grouped[..., :-1]
    # the union first (stable: ascending pages), repeats after
    order = repeat.to(torch.int8).sort(dim=-1, stable=True).indices
    grouped, repeat = grouped.gather(-1, order), repeat.gather(-1, order)
    if chosen.device.type == "cpu":
        width = int((~repeat).sum(-1).max())
        grouped, repeat = grouped[..., :width], repeat[..., :width]
    real = ~repeat & (grouped < complete)
    return grouped.clamp(max=complete - 1), real


class PageSelection(NamedTuple):
    """What one step reads: runs of ``page`` entries gathered per KV head.

    ``starts`` ``[b, Hk, r]`` the first entry of each run; ``entries`` ``[b, Hk, r * page]``
    the entries gathered; ``valid`` ``[b, Hq, r * page]`` which of them each query head reads
    (a page it did not choose, a repeated or unused slot, an entry read twice or not wanted
    does not count)."""

    starts: Tensor
    entries: Tensor
    valid: Tensor


class ExtraRuns(NamedTuple):
    """The runs beside the chosen pages (:meth:`Quest.extra_runs`), per entry they read:
    ``first`` (not read by an earlier run), ``fixed`` (a sink or recent entry), ``partial``
    (in the partial last page)."""

    starts: Tensor
    entries: Tensor
    first: Tensor
    fixed: Tensor
    partial: Tensor
