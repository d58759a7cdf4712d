"""The compress stage: which KV entries are kept after the prompt is prefilled.

A compress method returns the indices to keep; :class:`LayerKV.select` then replaces the
stored tensors with smaller ones, so the savings are physical. Score-based methods only say
how to score (:meth:`ScoredCompression.score`); the shared rule — keep the top
``budget - window`` scored entries plus the last ``window`` — lives here once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.engine.cache import LayerKV
from kvlab.compress.decoding import QUERIES, QueryWindow
from kvlab.registry import Budget, Method, param, resolve_budget


@dataclass(frozen=True)
class CompressMethod(Method, ABC):
    """Base of compress methods: :meth:`keep` chooses, the layer shrinks."""

    stage: ClassVar[str] = "compress"
    ragged_heads: ClassVar[bool] = False
    """True when KV heads may keep different numbers of entries (the engine then gives the
    layers ragged storage, :class:`~kvlab.engine.ragged.RaggedLayerKV`)."""

    def compress(self, q: Tensor, ctx: LayerContext) -> None:
        """Shrink ``ctx.layer`` at the end of the prompt prefill. ``q`` ``[b, Hq, t, d]`` are the
        unrotated queries of the forward's last ``t`` tokens (the observation window source)."""
        apply_keep(ctx.layer, self.keep(q, ctx))

    @abstractmethod
    def keep(self, q: Tensor, ctx: LayerContext) -> Keep:
        """Sorted indices of the entries to keep: ``[k]`` for all heads, ``[b, kv_heads, k]``
        per head, or, for a method with per-head budgets (:attr:`ragged_heads`), a list with one
        index set per KV head (any counts; ``None``: that head keeps all); ``None`` keeps
        everything."""

    def observe(self, q: Tensor, ctx: LayerContext) -> None:
        """Called in every layer after the attention of each chunk of the context prefill (the
        chunk's entries are stored; ``q`` ``[b, Hq, t, d]`` its unrotated queries), before
        :meth:`compress` on the last chunk. Methods whose statistics cover the whole prompt
        (H2O, Expected Attention) gather them here; by default nothing happens."""

    def after_decode_step(self, q: Tensor, ctx: LayerContext) -> None:
        """Called in every layer after each decoding step's attention (``q`` ``[b, Hq, 1, d]``,
        unrotated). Methods that evict while decoding act here; by default nothing happens."""

    @property
    def evicts_while_decoding(self) -> bool:
        """True when :meth:`after_decode_step` may evict entries (a session's rollback then
        needs snapshots, see :meth:`KVCache.mark`)."""
        return False


Keep = Union[Tensor, list[Optional[Tensor]], None]
"""What :meth:`CompressMethod.keep` returns (see there)."""


def apply_keep(layer: LayerKV, keep: Keep) -> None:
    """Shrink ``layer`` to ``keep``: per-head lists go to the ragged storage."""
    if keep is None:
        return
    if isinstance(keep, list):
        layer.select_per_head(keep)  # a RaggedLayerKV: the engine gives ragged_heads methods one
    else:
        layer.select(keep)


def select_merged(layer: LayerKV, keep: Tensor, start: int, keys: Tensor, values: Tensor) -> None:
    """Keep the entries at ``keep`` ``[b, kv_heads, k]``, then write merged ``keys`` /
    ``values`` ``[b, kv_heads, m, d]`` over the kept entries ``start .. start + m`` (merging
    methods: KVMerger, Chelsea). The selection made new tensors, so
    writing into them keeps :class:`LayerKV`'s storage rule."""
    layer.select(keep)
    end = start + keys.shape[2]
    layer.keys[:, :, start:end] = keys.to(layer.keys.dtype)
    layer.values[:, :, start:end] = values.to(layer.values.dtype)


def sinks_and_recent(entries: int, sink: int, recent: int, device: torch.device) -> Tensor:
    """Indices ``[sink + recent]`` of the first ``sink`` and the last ``recent`` of ``entries``
    entries (StreamingLLM's cache; DuoAttention's streaming heads)."""
    return torch.cat([
        torch.arange(sink, device=device), torch.arange(entries - recent, entries, device=device)
    ])


def top_k_plus_window(scores: Tensor, budget: int, window: int) -> Tensor:
    """Indices ``[b, heads, budget]`` (sorted) of the top ``budget - window`` entries by
    ``scores`` ``[b, heads, n - window]`` plus the last ``window`` entries."""
    prefix = scores.shape[-1]
    top = scores.topk(budget - window, dim=-1).indices
    recent = torch.arange(prefix, prefix + window, device=scores.device)
    recent = recent.expand(*scores.shape[:-1], window)
    return torch.cat([top, recent], dim=-1).sort(dim=-1).values


def attention_keys(ctx: LayerContext) -> Tensor:
    """The layer's keys ``[b, kv_heads, n, d]`` rotated as attention sees them at their own
    positions: the stored keys, or the stored keys rotated now when the position method keeps
    them pre-RoPE. Key-geometry scores (KeyDiff, Expected Attention) are defined on these."""
    layer = ctx.layer
    if not ctx.position.stores_pre_rope:
        return layer.keys
    return ctx.rotary.rotate(layer.keys, layer.key_positions())


def shared_or_per_head(keep: Tensor, kv_heads: int) -> Tensor:
    """One index set per batch row ``[b, k]`` as :meth:`LayerKV.select` wants it: ``[k]`` (one
    shared position tensor) for a batch of one, else the same set for every KV head."""
    if keep.shape[0] == 1:
        return keep[0]
    return keep[:, None, :].expand(-1, kv_heads, -1).contiguous()


@dataclass(frozen=True)
class ScoredCompression(CompressMethod):
    """Keep the top-scored entries per KV head plus an observation window of recent ones."""

    budget: Budget
    window: int
    decode_budget: int = param(
        0, "while decoding, compress back to this many entries (0: off; >= window)", min=0
    )
    decode_interval: int = param(512, "decoding steps between compressions (kvpress: 512)", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if 0 < self.decode_budget < self.window:
            from kvlab.errors import RecipeError

            raise RecipeError(
                f"{self.name}(decode_budget={self.decode_budget}): must be 0 or >= window={self.window}"
            )

    @property
    def evicts_while_decoding(self) -> bool:
        return self.decode_budget > 0

    def after_decode_step(self, q: Tensor, ctx: LayerContext) -> None:
        """Every ``decode_interval`` steps, compress the layer back to ``decode_budget`` entries
        with this method's scores; the observation window is the last decoding queries (as
        kvpress's DecodingPress does)."""
        if not self.decode_budget:
            return
        layer = ctx.layer
        window_state = layer.side.get(QUERIES)
        if not isinstance(window_state, QueryWindow):
            window_state = layer.side[QUERIES] = QueryWindow(max(1, self.window))
        window_state.add(q, ctx.positions)
        if window_state.steps < self.decode_interval:
            return
        window_state.steps = 0
        n = layer.num_entries
        if n <= self.decode_budget:
            return
        window = min(self.window, window_state.size)
        positions = window_state.positions[window_state.size - window :]
        queries = window_state.queries[:, :, window_state.size - window :]
        observed = replace(ctx, positions=positions)
        scores = self.score(queries, observed, window)
        layer.select(top_k_plus_window(scores, self.decode_budget, window))

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        n = ctx.layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        window = min(self.window, q.shape[2], budget)
        budget = self.layer_budget(budget, window, ctx)
        if budget == window:
            return torch.arange(n - window, n, device=q.device)
        scores = self.score(q[:, :, q.shape[2] - window :], ctx, window)
        return top_k_plus_window(scores, budget, window)

    def layer_budget(self, budget: int, window: int, ctx: LayerContext) -> int:
        """Entries this layer keeps (window included) when the method's budget is ``budget``:
        the same for every layer unless a method allocates budgets across layers."""
        return budget

    @abstractmethod
    def score(self, q_window: Tensor, ctx: LayerContext, window: int) -> Tensor:
        """Scores ``[b, kv_heads, n - window]`` of the entries before the window."""
