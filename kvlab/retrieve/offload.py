"""Mechanics shared by the retrieve methods that move most of the context out of the layer's
storage at the end of the prefill (ShadowKV, A2ATS) and bring back a few entries per step.

At the end of the context prefill such a method keeps in the layer's own storage only the
entries every step reads exactly (:func:`keep_exact`: sinks, outliers, the local window), and
puts the rest in its side index: a compact score index on the accelerator plus what a step
gathers from the **offloaded tier** (:func:`to_offload_tier`: pinned host memory on a GPU, a
separate tensor on a CPU-only machine, counted by ``offloaded_nbytes``, not ``nbytes``).
Entries appended after the prefill go to the layer's storage as usual and are read exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvlab.engine.cache import LayerKV
from kvlab.engine.context import LayerContext
from kvlab.engine.kernels import gather_entries


def to_offload_tier(x: Tensor) -> Tensor:
    """``x`` on the offloaded tier: pinned host memory when ``x`` is on an accelerator, else a
    copy of its own (so it is never a view of the layer's storage)."""
    if x.device.type == "cpu":
        return x.clone()
    return x.to("cpu").pin_memory()


def fetch(offloaded: Tensor, rows: Tensor) -> Tensor:
    """Rows ``rows`` ``[b, heads, k]`` of ``offloaded`` ``[b, heads, m, d]`` (offloaded tier),
    brought to ``rows``' device: ``[b, heads, k, d]``."""
    return gather_rows(offloaded, rows.to(offloaded.device)).to(rows.device, non_blocking=True)


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x`` ``[b, heads, m, d]`` (or ``[b, 1, m, d]``: rows shared by every head, ShadowKV's
    ``U``) at ``rows`` ``[b, heads, k]`` -> ``[b, heads, k, d]``: one ``index_select`` of whole
    rows (:func:`~kvlab.engine.kernels.gather_entries`), no ``[.., d]``-expanded index."""
    return gather_entries(x, rows)


def head_positions(layer: LayerKV) -> Tensor:
    """Positions of the layer's entries per KV head: ``[b, kv_heads, n]`` (int64)."""
    pos = layer.key_positions().long()
    if pos.dim() == 1:
        pos = pos.expand(layer.keys.shape[0], layer.kv_heads, -1)
    return pos


def unrotated_keys(ctx: LayerContext) -> Tensor:
    """The layer's keys before RoPE ``[b, kv_heads, n, d]`` (the rotation undone when keys are
    stored rotated: RoPE by ``-p`` inverts RoPE by ``p`` up to the attention factor squared)."""
    layer = ctx.layer
    if ctx.position.stores_pre_rope:
        return layer.keys
    back = ctx.rotary.rotate(layer.keys, -head_positions(layer))
    return back / ctx.rotary.attention_factor**2


def rotated_keys(ctx: LayerContext) -> Tensor:
    """The layer's keys after RoPE at their positions ``[b, kv_heads, n, d]``."""
    layer = ctx.layer
    if ctx.position.stores_pre_rope:
        return ctx.rotary.rotate(layer.keys, head_positions(layer))
    return layer.keys


def as_stored(ctx: LayerContext, pre_rope: Tensor, positions: Tensor) -> Tensor:
    """Keys rebuilt before RoPE, in the layer's stored format (rotated at ``positions``
    ``[b, kv_heads, k]`` unless the position method keeps keys before RoPE)."""
    return pre_rope if ctx.position.stores_pre_rope else ctx.rotary.rotate(pre_rope, positions)


def keep_exact(layer: LayerKV, keep: Tensor) -> None:
    """Keep only the entries ``keep`` ``[b, kv_heads, k]`` (sorted) in the layer's storage."""
    layer.select(keep)


def attend_with(
    q: Tensor, ctx: LayerContext, keys: Tensor, positions: Tensor, values: Tensor
) -> Tensor:
    """Exact attention of ``q`` over the layer's stored entries plus the retrieved ``keys`` /
    ``values`` ``[b, kv_heads, k, d]`` (stored format) at ``positions`` ``[b, kv_heads, k]``."""
    layer = ctx.layer
    all_keys = torch.cat([layer.keys, keys], dim=2)
    all_values = torch.cat([layer.values, values], dim=2)
    all_pos = torch.cat([head_positions(layer), positions.long()], dim=2)
    return ctx.attend(q, ctx.positions, all_keys, all_pos, all_values)


def nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


__all__ = [
    "as_stored", "attend_with", "fetch", "gather_rows", "head_positions", "keep_exact",
    "nbytes", "rotated_keys", "to_offload_tier", "unrotated_keys",
]
