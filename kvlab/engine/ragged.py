"""Ragged layers: KV heads that hold different numbers of entries.

Per-head budgets (AdaKV) and per-head policies (DuoAttention's retrieval and streaming heads)
keep a different number of entries in each KV head. Masking a rectangular cache would keep the
bytes; here each head gets its own :class:`~kvlab.engine.cache.LayerKV` (one KV head each), so
the stored tensors really shrink, and attention runs head by head over exactly what each head
keeps (:func:`ragged_attention`).

A :class:`RaggedLayerKV` is a plain rectangular :class:`LayerKV` until a compress method calls
:meth:`RaggedLayerKV.select_per_head`; from then on its heads are separate. The engine runs
one sequence at a time, so a ragged layer holds a batch of one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kvlab.engine.cache import LayerKV, LayerMark


class RaggedLayerKV(LayerKV):
    """One layer whose KV heads may keep different entries (see the module docstring).

    Once ragged, ``heads[h]`` holds head ``h``'s entries as a one-head :class:`LayerKV`
    (``keys`` ``[1, 1, n_h, d]``, its own positions and decoding reserve); the layer's own
    ``keys`` / ``values`` are ``None``, and side indexes are not supported (no method that
    needs one makes a layer ragged).
    """

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[LayerKV] | None = None

    @property
    def is_ragged(self) -> bool:
        return self.heads is not None

    @property
    def num_entries(self) -> int:
        """Entries of the largest head (every head's count: :meth:`head_entries`)."""
        if self.heads is None:
            return super().num_entries
        return max(head.num_entries for head in self.heads)

    def head_entries(self) -> list[int]:
        """Entries held by each KV head."""
        if self.heads is None:
            return [self.num_entries] * self.kv_heads
        return [head.num_entries for head in self.heads]

    @property
    def kv_heads(self) -> int:
        return len(self.heads) if self.heads is not None else super().kv_heads

    @property
    def is_contiguous(self) -> bool:
        return self.heads is None and super().is_contiguous

    def key_positions(self) -> Tensor:
        if self.heads is not None:
            raise RuntimeError("a ragged layer has no single key tensor: read layer.heads")
        return super().key_positions()

    def select_per_head(self, keep: list[Tensor | None]) -> None:
        """Keep, in KV head ``h``, the entries at ``keep[h]`` (sorted indices, any count;
        ``None``: all of them, and a ragged head is then left untouched, not copied). The first
        call splits the layer into one storage per head, holding only the kept entries."""
        if len(keep) != self.kv_heads:
            raise ValueError(f"select_per_head: {len(keep)} index sets for {self.kv_heads} KV heads")
        self.evictions += 1
        if self.heads is not None:
            for head, rows in zip(self.heads, keep):
                if rows is not None:
                    head.select(rows)
            return
        if self.keys.shape[0] != 1:
            raise ValueError("a ragged layer holds one sequence (batch of one)")
        if self.side:
            raise RuntimeError(f"a ragged layer cannot carry side indexes ({', '.join(self.side)})")
        positions = super().key_positions()
        self.heads = []
        for h, rows in enumerate(keep):
            head = LayerKV()
            head_positions = positions if positions.dim() == 1 else positions[0, h]
            if rows is None:  # the whole head, in storage of its own (a slice would pin the layer's)
                head.lazy_initialization(self.keys[:, h : h + 1].clone(), self.values[:, h : h + 1].clone())
                if self.positions is not None:
                    head.positions = head_positions.to(torch.int32).clone()
            else:
                head.lazy_initialization(
                    self.keys[:, h : h + 1].index_select(2, rows),
                    self.values[:, h : h + 1].index_select(2, rows),
                )
                head.positions = head_positions.index_select(0, rows).to(torch.int32)
            head.seen = self.seen
            self.heads.append(head)
        self.keys = self.values = self._key_storage = self._value_storage = None
        self.positions = None

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        if self.heads is None:
            super().append(keys, values, positions)
            return
        for h, head in enumerate(self.heads):
            head.append(keys[:, h : h + 1], values[:, h : h + 1], positions)
        self.seen = int(positions[-1]) + 1

    def select(self, keep: Tensor) -> None:
        if self.heads is None:
            super().select(keep)
        elif keep.dim() == 1:
            self.select_per_head([keep] * self.kv_heads)
        else:
            self.select_per_head(list(keep[0]))

    def truncate(self, num_entries: int, seen: int) -> None:
        """Drop every entry at a position ``>= seen`` (appended entries are the newest)."""
        if self.heads is None:
            super().truncate(num_entries, seen)
            return
        for head in self.heads:
            kept = int((head.key_positions() < seen).sum())
            head.truncate(kept, seen)
        self.seen = seen

    def mark(self, snapshot: bool) -> LayerMark:
        if self.heads is None:
            return super().mark(snapshot)
        return LayerMark(self.num_entries, self.seen, self.evictions, self.snapshot() if snapshot else None)

    def snapshot(self) -> dict[str, Any]:
        state = super().snapshot()
        if self.heads is not None:
            state["heads"] = [head.snapshot() for head in self.heads]
        return state

    def load_snapshot(self, state: dict[str, Any]) -> None:
        heads = state.get("heads")
        super().load_snapshot({**state, "heads": None})
        if heads is not None:
            self.heads = []
            for head_state in heads:
                head = LayerKV()
                head.load_snapshot(head_state)
                self.heads.append(head)

    def drop_reserve(self) -> None:
        if self.heads is None:
            super().drop_reserve()
            return
        for head in self.heads:
            head.drop_reserve()

    def nbytes(self) -> int:
        if self.heads is None:
            return super().nbytes()
        return sum(head.nbytes() for head in self.heads)


def ragged_attention(query: Tensor, q_pos: Tensor, layer: RaggedLayerKV, attend) -> Tensor:
    """Exact attention of ``query`` ``[1, Hq, t, d]`` over a ragged layer: the query heads of
    KV head ``h`` (GQA group) attend over exactly the entries head ``h`` keeps. ``attend`` is
    :meth:`LayerContext.attend`."""
    group = query.shape[1] // layer.kv_heads
    outputs = [
        attend(query[:, h * group : (h + 1) * group], q_pos, head.keys, head.key_positions(), head.values)
        for h, head in enumerate(layer.heads)
    ]
    return torch.cat(outputs, dim=1)


__all__ = ["RaggedLayerKV", "ragged_attention"]
