"""Compression while decoding: the state a compress method keeps between decoding steps.

Long generations grow the cache again. Two forms exist in the literature and in kvlab:
every-N-steps compression back to a budget with any scorer (kvpress's DecodingPress; the
``decode_budget`` option of :class:`~kvlab.compress.base.ScoredCompression`), and per-step
eviction (H2O, TOVA). The side indexes here live in ``LayerKV.side`` and count in ``nbytes``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvlab.engine.cache import LayerKV

QUERIES = "decode.queries"
SIZE = "decode.size"


class QueryWindow:
    """The last ``capacity`` unrotated decoding queries ``[b, Hq, w, d]`` and their positions:
    the observation window of compression during decoding. Cleared when the layer changes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queries: Tensor | None = None
        self.positions: Tensor | None = None
        self.steps = 0  # queries added since the last compression check

    def add(self, q: Tensor, positions: Tensor) -> None:
        if self.queries is None:
            self.queries, self.positions = q, positions
        else:
            self.queries = torch.cat([self.queries, q], dim=2)[:, :, -self.capacity :]
            self.positions = torch.cat([self.positions, positions])[-self.capacity :]
        self.steps += 1

    @property
    def size(self) -> int:
        return 0 if self.queries is None else self.queries.shape[2]

    def nbytes(self) -> int:
        if self.queries is None:
            return 0
        return self.queries.numel() * self.queries.element_size() + self.positions.numel() * self.positions.element_size()

    def truncate(self, num_entries: int) -> None:
        self.queries = self.positions = None  # a discarded request's queries go with it
        self.steps = 0

    def on_select(self, keep: Tensor) -> None:
        self.queries = self.positions = None
        self.steps = 0


class CacheSize:
    """The cache size a per-step eviction method holds a layer to (entries per head).
    A Python int: it holds no tensor, so it adds no bytes."""

    def __init__(self, entries: int) -> None:
        self.entries = entries

    def nbytes(self) -> int:
        return 0

    def truncate(self, num_entries: int) -> None:
        return None

    def on_select(self, keep: Tensor) -> None:
        return None


def cache_size(layer: LayerKV) -> int | None:
    size = layer.side.get(SIZE)
    return size.entries if isinstance(size, CacheSize) else None


def all_but(drop: Tensor, n: int) -> Tensor:
    """Sorted indices ``[..., n - 1]`` of ``range(n)`` without ``drop`` ``[...]`` (one per row)."""
    index = torch.arange(n, device=drop.device).expand(*drop.shape, n)
    mask = index != drop[..., None]
    return index[mask].reshape(*drop.shape, n - 1)
