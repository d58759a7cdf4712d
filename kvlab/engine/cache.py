"""KV storage: one :class:`LayerKV` per layer (the model-facing ``Cache`` that holds them is
:class:`kvlab.engine.sequence.KVCache`).

Savings are physical: compression replaces the stored tensors with smaller ones (per KV head
when the method selects per head), and :meth:`LayerKV.nbytes` sums the bytes of every tensor
the cache holds — keys, values, position indices and method-owned side indexes — on the
accelerator. A side index may keep part of its tensors on a second, offloaded tier (host memory,
ShadowKV's values): those are counted apart, by :meth:`LayerKV.offloaded_nbytes`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class SideIndex(Protocol):
    """A method-owned structure stored beside a layer's entries (e.g. Quest page bounds)."""

    def nbytes(self) -> int:
        """Bytes held on the accelerator tier."""

    def truncate(self, num_entries: int) -> None:
        """Forget everything derived from entries at index >= ``num_entries``."""

    def on_select(self, keep: Tensor) -> None:
        """Follow :meth:`LayerKV.select` (keep the rows of the kept entries, or reset)."""


DECODE_BLOCK = 32
"""Most entries reserved at once when decoding outgrows a layer's storage: n // 16, capped at
this, so the reserve stays under 1/16 of the layer. Prompt chunks and compression allocate
exactly. Reserved entries are allocated memory and count in nbytes."""


_RANGES: dict[torch.device, Tensor] = {}


def entry_range(n: int, device: torch.device) -> Tensor:
    """``0, 1, ..., n - 1`` (int64) as a view of one table per device, grown by doubling: a
    contiguous layer's positions are asked for in every layer and decoding step, and need not
    be written anew each time. Read-only: never write into the view."""
    table = _RANGES.get(device)
    if table is None or table.numel() < n:
        table = _RANGES[device] = torch.arange(max(n, 2 * (0 if table is None else table.numel()), 4096),
                                               device=device)
    return table[:n]


class LayerKV:
    """One layer's KV entries.

    - ``keys``, ``values``: ``[batch, kv_heads, n, head_dim]`` views of storage that may hold
      up to :data:`DECODE_BLOCK` reserved entries more, so decoding appends in place.
    - ``positions``: original token position of each entry, ``[n]`` (shared by all heads) or
      ``[batch, kv_heads, n]`` (per head, after per-head selection); ``None`` while the layer
      holds exactly tokens ``0..n-1`` (nothing evicted), so no index tensor is stored.
    - ``side``: method-owned side indexes, counted in :meth:`nbytes`.

    Storage rule, which :meth:`mark` relies on: a stored tensor is never written in place within
    its used range; selection and truncation replace tensors, and in-place appends only write
    beyond the used range (into the reserve). A subclass must keep this rule or override
    :meth:`snapshot` / :meth:`restore`.
    """

    is_sliding = False  # what transformers asks of a cache layer
    is_compileable = False
    window: int | None = None
    """A sliding-window (local) layer's window (:class:`SlidingLayerKV`); None: a global
    layer, which holds the whole sequence (or what the recipe's methods kept of it)."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.is_initialized = False
        self.positions: Tensor | None = None
        self.seen = 0  # tokens ever appended: the next token's position
        self.side: dict[str, SideIndex] = {}
        self.evictions = 0  # selections so far: a rollback by truncation is exact only without one
        self._key_storage: Tensor | None = None
        self._value_storage: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Start the layer with these entries (``[batch, kv_heads, t, d]``)."""
        self._store(key_states.contiguous(), value_states.contiguous())
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    @property
    def num_entries(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def capacity(self) -> int:
        """Entries the allocated storage can hold: the used ones plus the decoding reserve."""
        return 0 if self._key_storage is None else self._key_storage.shape[-2]

    @property
    def kv_heads(self) -> int:
        """KV heads of the stored entries (cheap for every storage format)."""
        return self.keys.shape[1]

    def head_entries(self) -> list[int]:
        """Entries held by each KV head (all equal unless the layer is ragged), those a side
        index holds on the offloaded tier in place of the storage included (its optional
        ``offloaded_entries``: a retrieve method that moved context entries out)."""
        n = self.num_entries + sum(getattr(i, "offloaded_entries", 0) for i in self.side.values())
        return [n] * self.kv_heads if n else []

    @property
    def is_contiguous(self) -> bool:
        """True while the layer holds every token ``0..n-1`` in order."""
        return self.positions is None

    def key_positions(self) -> Tensor:
        """Position of every entry: ``[n]`` or ``[batch, kv_heads, n]``."""
        if self.positions is not None:
            return self.positions
        return entry_range(self.num_entries, self.keys.device)

    def entry_positions(self, entries: Tensor, heads: slice | Tensor = slice(None)) -> Tensor:
        """Token positions ``[b, h, m]`` of the entries ``entries`` ``[b, h, m]`` each KV head
        of ``heads`` (a slice or int64 indices; all by default) gathered: the entries themselves while the layer is
        contiguous (entry ``i`` holds token ``i``), else read from :attr:`positions`."""
        if self.positions is None:
            return entries
        if self.positions.dim() == 1:
            return self.positions[entries]
        return self.positions[:, heads].gather(2, entries)

    def load_entries(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Start the layer with exactly these entries ``[batch, kv_heads, n, d]`` at ``positions``
        ``[n]``, in any order and possibly repeated (documents encoded apart after one prefix
        share positions: APE); the next token's position is after the largest."""
        self._store(keys, values)
        self.is_initialized = True
        self.positions = positions.to(torch.int32).contiguous()
        self.seen = int(positions.max()) + 1 if positions.numel() else 0

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Add ``t`` new entries ``[batch, kv_heads, t, d]`` at ``positions`` ``[t]``."""
        if not self.is_initialized or self.keys is None:
            self.lazy_initialization(keys, values)
        else:
            n, t = self.num_entries, keys.shape[-2]
            reserve = decode_reserve(n, t)
            self._key_storage = append_in_place(self._key_storage, n, keys, reserve)
            self._value_storage = append_in_place(self._value_storage, n, values, reserve)
            self.keys = self._key_storage[..., : n + t, :]
            self.values = self._value_storage[..., : n + t, :]
        self._append_positions(positions)

    def _append_positions(self, positions: Tensor) -> None:
        """Record the positions ``[t]`` of appended entries (storage formats share this)."""
        if self.positions is not None:
            new = positions.to(self.positions.dtype)
            if self.positions.dim() == 3:
                new = new.expand(*self.positions.shape[:2], -1)
            self.positions = torch.cat([self.positions, new], dim=-1)
        elif int(positions[0]) < self.seen:
            raise AssertionError(f"{type(self).__name__}.append: tokens must be appended in order")
        elif int(positions[-1]) - int(positions[0]) + 1 != positions.numel() or int(positions[0]) != self.seen:
            # tokens with gaps (a token-selective prefill propagated only some): record positions
            held = torch.arange(self.num_entries - positions.numel(), device=positions.device)
            self.positions = torch.cat([held, positions.to(held.dtype)])
        self.seen = int(positions[-1]) + 1

    def select(self, keep: Tensor) -> None:
        """Keep only the entries at ``keep``: ``[k]`` for all heads or ``[batch, kv_heads, k]``
        per head (sorted). The stored tensors are replaced by smaller copies."""
        self.evictions += 1
        positions = self.key_positions()
        if keep.dim() == 1:
            self._store(self.keys.index_select(-2, keep), self.values.index_select(-2, keep))
        else:
            index = keep[..., None].expand(-1, -1, -1, self.keys.shape[-1])
            self._store(self.keys.gather(-2, index), self.values.gather(-2, index))
        self._select_positions(positions, keep)

    def _select_positions(self, positions: Tensor, keep: Tensor) -> None:
        """Keep the positions of the selected entries and let side indexes follow."""
        if keep.dim() == 1:
            new_positions = positions.index_select(-1, keep)
        else:
            if positions.dim() == 1:
                positions = positions.expand(*keep.shape[:2], -1)
            new_positions = positions.gather(-1, keep)
        self.positions = new_positions.to(torch.int32).contiguous()
        for index in self.side.values():
            index.on_select(keep)

    def truncate(self, num_entries: int, seen: int) -> None:
        """Drop entries from index ``num_entries`` on (used to discard a request's tokens)."""
        self._store(self.keys[..., :num_entries, :].clone(), self.values[..., :num_entries, :].clone())
        if self.positions is not None:
            self.positions = self.positions[..., :num_entries].clone()
        self.seen = seen
        for index in self.side.values():
            index.truncate(num_entries)

    def mark(self, snapshot: bool) -> LayerMark:
        """Where this layer stands now. With ``snapshot``, also what it holds, so that
        :meth:`restore` is exact even if entries are evicted in between (decoding-time
        eviction); without, :meth:`restore` can only drop appended entries."""
        return LayerMark(self.num_entries, self.seen, self.evictions, self.snapshot() if snapshot else None)

    def restore(self, mark: LayerMark) -> None:
        """Come back to ``mark`` (taken on this layer; marks taken after it become invalid)."""
        if self.evictions == mark.evictions:
            self.truncate(mark.entries, mark.seen)
        elif mark.state is not None:
            self.load_snapshot(mark.state)
        else:
            raise RuntimeError(
                "LayerKV.restore: entries were evicted since a mark taken without a snapshot"
            )

    def snapshot(self) -> dict[str, Any]:
        """The layer's state: tensors by reference (see the storage rule), side indexes copied."""
        state = dict(self.__dict__)
        state["side"] = copy.deepcopy(self.side)
        return state

    def load_snapshot(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.side = copy.deepcopy(state["side"])

    def fork(self) -> LayerKV:
        """A second layer holding the same entries, for another request on the same stored
        context: it shares this layer's tensors (by the storage rule neither writes within the
        used range), copies its side indexes, and has no decoding reserve, so its first append
        moves its entries to storage of its own and never writes where this layer (or another
        fork) would. Dropping a fork frees only what it appended."""
        twin = copy.copy(self)
        twin.load_snapshot(self.snapshot())
        twin.drop_reserve()
        return twin

    def drop_reserve(self) -> None:
        """Let the storage end at the used entries (see :meth:`fork`); a storage format with
        other tensors overrides this."""
        if self._key_storage is not None:
            self._key_storage, self._value_storage = self.keys, self.values

    def end_prefill(self) -> None:
        """Called once the context's prefill (and compression) is done; a storage format
        that converts entries (e.g. quantisation) does it here. Plain storage does nothing."""

    def _store(self, keys: Tensor, values: Tensor) -> None:
        """Replace the storage by exactly these entries."""
        self._key_storage, self._value_storage = keys.contiguous(), values.contiguous()
        self.keys, self.values = self._key_storage, self._value_storage

    def nbytes(self) -> int:
        """Bytes of the storage (reserved entries included), positions and side indexes."""
        tensors = [self._key_storage, self._value_storage, self.positions]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total + sum(index.nbytes() for index in self.side.values())

    def offloaded_nbytes(self) -> int:
        """Bytes the side indexes keep on the offloaded tier (an index's optional
        ``offloaded_nbytes()``); none of them are in :meth:`nbytes`."""
        return sum(getattr(index, "offloaded_nbytes", _none)() for index in self.side.values())


class SlidingLayerKV(LayerKV):
    """A sliding-window (local) layer's entries: the last ``window - 1`` tokens only.

    Gemma-3's local layers (Gemma Team, "Gemma 3 Technical Report", 2025, arXiv:2503.19786,
    sec. 2: local layers attend over a sliding window of ``sliding_window`` tokens, one global
    layer every few local ones) let a query at position ``p`` see keys at ``p - window + 1 ..
    p``: the next token needs only the ``window - 1`` before it. After each forward the
    attention entry point calls :meth:`slide`, which drops older entries *physically*: a
    prompt chunk's storage is replaced by a copy of the kept entries, a decoding step moves
    the view's start inside a storage of at most ``window`` plus a decoding reserve entries
    (:func:`decode_reserve` of the window), copied anew only when the reserve runs out.
    :meth:`nbytes` is therefore bounded by the window whatever the sequence's length.

    The layer always holds a run of consecutive tokens ``seen - n .. seen - 1`` (no position
    tensor is stored); tokens must be appended in order and without gaps. Every drop counts
    as an eviction, so :meth:`mark` always snapshots (a rollback must bring dropped entries
    back: a question appended to a context in a session slides old context out).
    """

    is_sliding = True

    def __init__(self, window: int) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"SlidingLayerKV: window={window} must be at least 1")
        self.window = window
        self._start = 0  # first used entry of the storage

    @property
    def kept(self) -> int:
        """Entries kept after a forward: the window before the next token."""
        return self.window - 1

    @property
    def storage_limit(self) -> int:
        """Most entries the storage holds after a forward: the kept ones, the next token and
        the decoding reserve."""
        return self.window + decode_reserve(self.kept, 1)

    @property
    def is_contiguous(self) -> bool:
        return self.num_entries == self.seen

    def key_positions(self) -> Tensor:
        n = self.num_entries
        return entry_range(self.seen, self.keys.device)[self.seen - n :]

    def entry_positions(self, entries: Tensor, heads: slice = slice(None)) -> Tensor:
        return entries + (self.seen - self.num_entries)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Add ``t`` new entries ``[batch, kv_heads, t, d]`` at ``positions`` ``[t]``, which
        must be the next ``t`` tokens (``seen .. seen + t - 1``)."""
        t = keys.shape[-2]
        if int(positions[0]) != self.seen or int(positions[-1]) != self.seen + t - 1:
            raise AssertionError(
                f"SlidingLayerKV.append: positions {int(positions[0])}..{int(positions[-1])} are not the "
                f"next {t} tokens from {self.seen}: a sliding-window layer holds consecutive tokens"
            )
        if not self.is_initialized or self.keys is None:
            self.lazy_initialization(keys, values)
        else:
            n, end = self.num_entries, self._start + self.num_entries
            if end + t > self.capacity:  # move the used entries to a new storage, reserve after
                self._key_storage = append_in_place(self.keys, n, keys, decode_reserve(self.kept, t))
                self._value_storage = append_in_place(self.values, n, values, decode_reserve(self.kept, t))
                self._start, end = 0, n
            else:
                self._key_storage[..., end : end + t, :] = keys
                self._value_storage[..., end : end + t, :] = values
            self.keys = self._key_storage[..., self._start : end + t, :]
            self.values = self._value_storage[..., self._start : end + t, :]
        self.seen += t

    def slide(self) -> None:
        """Drop the entries no later token can attend to (all but the last ``window - 1``);
        free their memory when the storage outgrew :attr:`storage_limit` (a prompt chunk)."""
        drop = self.num_entries - self.kept
        if drop <= 0:
            return
        self.evictions += 1
        if self.capacity > self.storage_limit:
            self._store(self.keys[..., drop:, :].clone(), self.values[..., drop:, :].clone())
        else:
            self._start += drop
            end = self._start + self.kept
            self.keys = self._key_storage[..., self._start : end, :]
            self.values = self._value_storage[..., self._start : end, :]

    def select(self, keep: Tensor) -> None:
        raise AssertionError("SlidingLayerKV.select: a sliding-window layer keeps its window, nothing else")

    def mark(self, snapshot: bool) -> LayerMark:
        return super().mark(True)

    def _store(self, keys: Tensor, values: Tensor) -> None:
        super()._store(keys, values)
        self._start = 0


def _none() -> int:
    return 0


def decode_reserve(entries: int, new: int) -> int:
    """Entries to reserve when a layer of ``entries`` outgrows its storage by ``new``: a small
    block while decoding (see :data:`DECODE_BLOCK`), none for a prompt chunk."""
    return min(DECODE_BLOCK, entries // 16) if new == 1 else 0


def append_in_place(storage: Tensor, used: int, new: Tensor, reserve: int) -> Tensor:
    """Write ``new`` ``[..., t, d]`` after the first ``used`` entries of ``storage``; when it
    does not fit, first move them to a new storage with ``reserve`` entries to spare. Returns
    the storage written (the same tensor while the reserve lasts). Only entries at or beyond
    ``used`` are written: the storage rule of :class:`LayerKV`."""
    t = new.shape[-2]
    if used + t > storage.shape[-2]:
        shape = (*storage.shape[:-2], used + t + reserve, storage.shape[-1])
        grown = torch.empty(shape, dtype=storage.dtype, device=storage.device)
        grown[..., :used, :] = storage[..., :used, :]
        storage = grown
    storage[..., used : used + t, :] = new
    return storage


@dataclass(frozen=True)
class LayerMark:
    """Where a layer stood (see :meth:`LayerKV.mark`)."""

    entries: int
    seen: int
    evictions: int
    state: dict[str, Any] | None = None


@dataclass(frozen=True)
class CacheMark:
    """Where a cache stood, to come back to it (see :meth:`KVCache.rollback`)."""

    layers: tuple[LayerMark, ...]


__all__ = ["LayerKV", "SlidingLayerKV", "append_in_place", "decode_reserve", "CacheMark", "LayerMark", "SideIndex"]
