"""ThinK: the least important key channels of each KV head pruned, stored really narrower.

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", ICLR 2025, arXiv:2407.21018.
Attention logits are sums over channels, ``q . k = sum_c q_c k_c``, and a few channels carry
most of them. ThinK keeps, per KV head, the channels whose query-key interaction is largest
over an observation window of the last queries and drops the rest of the *keys* (values are
untouched).

Rules (the paper's Section 3.2 and its reference code, ``SalesforceAIResearch/ThinK``):

- At the end of the context prefill, after eviction, per KV head and channel ``c``:
  ``score_c = mean over the last `window` queries of q_c^2  x  mean over the kept keys of k_c^2``
  (``||Q_obs[:, c]|| * ||K[:, c]||`` squared, up to constants). Queries are rotated at their
  positions, as the stored keys are post-RoPE, so both sides are the vectors attention
  multiplies. GQA: the query heads of one KV head are pooled by summing their ``q_c^2``
  (one channel set per KV head, as storage is per KV head).
- The ``floor(ratio * d)`` lowest-scored channels are dropped (the reference code's
  ``int(head_dim * ratio)``); the other ``d - floor(ratio * d)`` are kept, per KV head.
  ``ratio = 0`` keeps the plain storage (nothing pruned, no index stored).
- Only the prefill cache is pruned: keys appended afterwards (a question, decoded tokens) stay
  full width. (The reference code also leaves the last 32 prefill keys full width; kvlab
  prunes every prefill key.)
- A pruned key reads back with zeros in its dropped channels, so ``q . k`` equals the dot
  product over the kept channels exactly and attention needs no change.
- Position methods that keep keys before RoPE (``self_extend``, ``dynamic_ntk`` with
  ``rerotate_cache``) are refused: pruning channels of unrotated keys selects something else.

Storage (per layer; ``b`` batch, ``h`` KV heads, ``d`` head dim, ``d_kept`` kept channels):

- pruned keys ``[b, h, np, d_kept]`` of the first ``np`` entries (the prefill's),
- their channel indices ``[b, h, d_kept]``, uint8 (int16 when ``d > 256``), sorted;
- full-width keys ``[b, h, n - np, d]`` of the later entries, and values ``[b, h, n, d]``,
  both appended in place with :class:`~kvlab.engine.cache.LayerKV`'s reserve rule;
- ``positions`` and side indexes as in :class:`~kvlab.engine.cache.LayerKV`.

:meth:`ThinKLayerKV.nbytes` counts all of it. Reading ``keys`` materialises ``[b, h, n, d]``
(zeros scattered with the kept channels, then the full-width part): ``O(n * d)`` work and a
transient copy per read and layer, as dense attention over the layer costs anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.engine.cache import LayerKV, append_in_place, decode_reserve
from kvlab.errors import RecipeError
from kvlab.quantize.base import QuantizeMethod
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class ThinK(QuantizeMethod):
    name: ClassVar[str] = "think"
    paper: ClassVar[str] = "Xu et al., ThinK, ICLR 2025, arXiv:2407.21018"
    summary: ClassVar[str] = (
        "Prunes the key channels with the least query-key interaction, per KV head (narrower keys)."
    )
    needs_rotated_keys: ClassVar[bool] = True

    ratio: float = param(
        0.4, "pruning ratio lambda: fraction of key channels dropped per KV head, in [0, 1)",
        min=0.0,
    )
    window: int = param(32, "observation window: the last queries that score the channels", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio >= 1.0:
            raise RecipeError(
                f"{self.name}(ratio={self.ratio!r}): must be in [0, 1) (the fraction of key "
                "channels dropped; at least one channel is kept)"
            )

    def new_layer(self) -> ThinKLayerKV:
        return ThinKLayerKV()

    def kept_channels(self, head_dim: int) -> int:
        """``d - floor(ratio * d)`` (the tolerance keeps e.g. ``0.3 * 10`` at 3)."""
        return head_dim - math.floor(self.ratio * head_dim + 1e-9)

    def channel_scores(self, q: Tensor, ctx: LayerContext) -> Tensor:
        """fp32 ``[b, h, d]``: per KV head and channel, mean ``q_c^2`` over the last ``window``
        rotated queries (summed over the head's query heads) x mean ``k_c^2`` over its keys."""
        window = min(self.window, q.shape[2])
        observed = ctx.rotary.rotate(q[:, :, -window:], ctx.positions[-window:])
        keys = ctx.layer.keys
        b, query_heads, _, d = observed.shape
        kv_heads = keys.shape[1]
        q_power = observed.float().pow(2).mean(dim=2)
        q_power = q_power.view(b, kv_heads, query_heads // kv_heads, d).sum(dim=2)
        return q_power * keys.float().pow(2).mean(dim=2)

    def convert(self, q: Tensor, ctx: LayerContext) -> None:
        """Prune the layer's key channels (``q`` ``[b, Hq, t, d]``, the prefill's last queries,
        unrotated), then end the prefill."""
        layer = ctx.layer
        if layer.num_entries:
            d = q.shape[-1]
            kept = self.kept_channels(d)
            if kept < d:
                scores = self.channel_scores(q, ctx)
                layer.prune_channels(scores.topk(kept, dim=-1).indices.sort(dim=-1).values)
        layer.end_prefill()


def channel_dtype(head_dim: int) -> torch.dtype:
    """The smallest integer dtype that holds a channel index below ``head_dim``."""
    return torch.uint8 if head_dim <= 256 else torch.int16


class ThinKLayerKV(LayerKV):
    """One layer whose prefill keys are stored with fewer channels (see the module docstring).

    Until :meth:`prune_channels` it is a plain :class:`LayerKV`. After it:

    - ``keys`` is a read-only property that materialises ``[b, h, n, d]``;
    - :meth:`append` adds full-width entries in place (a reserve, as in :class:`LayerKV`);
    - :meth:`select` is exact: kept entries keep their stored keys. When a per-head selection
      leaves heads with different numbers of pruned entries, every head keeps the smallest
      count pruned and the others' extra kept pruned entries move to the full-width part, as
      they read (zeros in the dropped channels): attention is unchanged, the extra entries
      cost full width;
    - :meth:`truncate` keeps the first entries exactly as stored (rolling back a question
      returns the layer to how the prefill left it, byte for byte).

    :meth:`LayerKV.mark` snapshots (``__dict__`` with tensors by reference) are exact: the
    layer keeps LayerKV's storage rule. Pruned keys, channel indices and positions are only
    ever replaced; the full-width keys and the values are written in place only beyond the
    used entries (the reserve), by :meth:`append`.
    """

    def __init__(self) -> None:
        self._tail_keys: Tensor | None = None  # full-width keys: all of them until pruned
        self._pruned_keys: Tensor | None = None  # [b, h, np, d_kept]; None until pruned
        self.channels: Tensor | None = None  # [b, h, d_kept], sorted; None until pruned
        super().__init__()

    # -- keys: LayerKV's attribute until pruned, materialised after -------------------------
    @property
    def pruned(self) -> bool:
        return self.channels is not None

    @property
    def pruned_entries(self) -> int:
        """Entries stored with pruned keys (the first ones)."""
        return 0 if self._pruned_keys is None else self._pruned_keys.shape[2]

    @property
    def keys(self) -> Tensor | None:
        """``[b, h, n, d]``: pruned keys with zeros in their dropped channels, then the
        full-width keys."""
        if not self.pruned:
            return self._tail_keys
        return torch.cat([self._widened(), self._tail_keys], dim=2)

    @keys.setter
    def keys(self, keys: Tensor | None) -> None:
        if self.pruned:
            raise AttributeError(
                "ThinKLayerKV.keys is read-only once pruned (after prune_channels); "
                "change entries with append, select or truncate"
            )
        self._tail_keys = keys

    def _widened(self) -> Tensor:
        """The pruned keys back at full width ``[b, h, np, d]``, zeros in dropped channels."""
        pruned = self._pruned_keys
        b, h, n, _ = pruned.shape
        wide = pruned.new_zeros(b, h, n, self._tail_keys.shape[-1])
        return wide.scatter_(3, self.channels.long()[:, :, None, :].expand(-1, -1, n, -1), pruned)

    @property
    def num_entries(self) -> int:
        if not self.pruned:
            return super().num_entries
        return self.pruned_entries + self._tail_keys.shape[2]

    @property
    def kv_heads(self) -> int:
        return self._tail_keys.shape[1]  # no materialisation just to count heads

    def key_positions(self) -> Tensor:
        if self.positions is not None or not self.pruned:
            return super().key_positions()
        return torch.arange(self.num_entries, device=self.values.device)

    # -- the lifecycle --------------------------------------------------------------------------
    def prune_channels(self, kept: Tensor) -> None:
        """Store the current entries' keys with only the channels ``kept`` ``[b, h, d_kept]``
        (sorted, per KV head); later entries stay full width."""
        if self.pruned:
            raise RuntimeError("ThinKLayerKV.prune_channels: the layer is already pruned")
        keys = self._tail_keys
        b, h, n, d = keys.shape
        index = kept[:, :, None, :].expand(-1, -1, n, -1)
        self._pruned_keys = keys.gather(3, index).contiguous()
        self.channels = kept.to(channel_dtype(d)).contiguous()
        self._key_storage = keys.new_empty(b, h, 0, d)
        self._tail_keys = self._key_storage

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Add ``t`` full-width entries ``[b, h, t, d]`` at ``positions`` ``[t]``, in place
        when the reserve allows (the reserve rule of :meth:`LayerKV.append`)."""
        if not self.pruned:
            super().append(keys, values, positions)
            return
        n, tail, t = self.num_entries, self._tail_keys.shape[2], keys.shape[2]
        reserve = decode_reserve(n, t)
        self._key_storage = append_in_place(self._key_storage, tail, keys, reserve)
        self._value_storage = append_in_place(self._value_storage, n, values, reserve)
        self._tail_keys = self._key_storage[:, :, : tail + t]
        self.values = self._value_storage[:, :, : n + t]
        self._append_positions(positions)

    def select(self, keep: Tensor) -> None:
        """Keep the entries at ``keep`` (``[k]`` or ``[b, h, k]``, sorted) as they are stored
        (see the class docstring for per-head selections that mix the two parts)."""
        if not self.pruned:
            super().select(keep)
            return
        self.evictions += 1
        positions = self.key_positions()
        b, h, _, d = self.values.shape
        rows = keep if keep.dim() == 3 else keep.expand(b, h, -1)
        pruned = self.pruned_entries
        still = int((rows < pruned).sum(dim=-1).min()) if rows.numel() else 0
        first, rest = rows[..., :still], rows[..., still:]
        if bool((rest >= pruned).all()):
            tail = self._tail_keys.gather(2, (rest - pruned)[..., None].expand(-1, -1, -1, d))
        else:  # extra pruned entries of some heads: full width, as they read
            tail = self.keys.gather(2, rest[..., None].expand(-1, -1, -1, d))
        kept = self._pruned_keys.shape[-1]
        self._pruned_keys = self._pruned_keys.gather(
            2, first[..., None].expand(-1, -1, -1, kept)
        ).contiguous()
        values = self.values.gather(2, rows[..., None].expand(-1, -1, -1, d))
        self._store_tail(tail, values)
        self._select_positions(positions, keep)

    def truncate(self, num_entries: int, seen: int) -> None:
        """Drop entries from index ``num_entries`` on; the others stay as stored."""
        if not self.pruned:
            super().truncate(num_entries, seen)
            return
        pruned = self.pruned_entries
        if num_entries < pruned:
            self._pruned_keys = self._pruned_keys[:, :, :num_entries].clone()
        tail = self._tail_keys[:, :, : max(0, num_entries - pruned)].clone()
        self._store_tail(tail, self.values[:, :, :num_entries].clone())
        if self.positions is not None:
            self.positions = self.positions[..., :num_entries].clone()
        self.seen = seen
        for index in self.side.values():
            index.truncate(num_entries)

    def _store_tail(self, tail_keys: Tensor, values: Tensor) -> None:
        """Replace the full-width keys and the values by exactly these entries."""
        self._key_storage, self._value_storage = tail_keys.contiguous(), values.contiguous()
        self._tail_keys, self.values = self._key_storage, self._value_storage

    def drop_reserve(self) -> None:
        """The full-width keys end at the used ones (the pruned keys have no reserve)."""
        if self._key_storage is not None:
            self._key_storage, self._value_storage = self._tail_keys, self.values

    def nbytes(self) -> int:
        """Pruned keys, channel indices, full-width keys and values (reserve included),
        positions and side indexes."""
        total = super().nbytes()
        if self.pruned:
            total += sum(t.numel() * t.element_size() for t in (self._pruned_keys, self.channels))
        return total


__all__ = ["ThinK", "ThinKLayerKV", "channel_dtype"]
