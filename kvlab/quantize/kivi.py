"""KIVI: keys quantised per channel, values per token, the newest tokens in full precision.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv:2402.02750. Key outliers sit in fixed channels, so keys are quantised **per channel**:
each group of ``group`` consecutive tokens shares, per channel, an asymmetric min-max scale and
zero. Values are quantised **per token**: each group of ``group`` channels of one token shares a
scale and zero. The most recent tokens stay in full precision (the *residual*), which keeps the
tokens the next queries look at most exact and lets key groups be filled whole.

Rules (the paper's Algorithm 1 and its reference code, ``jy-yuan/KIVI``):

- End of the prefill, ``n`` entries: the first ``floor(n / residual) * residual`` keys are
  quantised (whole groups, as ``residual`` is a multiple of ``group``), the ``n % residual``
  newest stay in full precision; all values but the ``residual`` newest are quantised.
- Decoding: new entries join the full-precision residual. The same rule *settles* the residual
  before each append: a key residual that reached ``residual`` entries is quantised as a whole;
  values beyond ``residual`` are quantised oldest first (FIFO; one per decoding step, exact
  because values are quantised per token). Settling before rather than after an append means
  each new token is attended in full precision in its own step, as in the reference code (which
  quantises after attention). Between decoding steps a layer therefore holds at most
  ``residual`` full-precision keys and ``residual + 1`` full-precision values (after a
  ``t``-token append: ``residual - 1 + t`` and ``residual + t``).

Storage (per layer; ``b`` batch, ``h`` KV heads, ``d`` head dim):

- quantised keys: codes uint8 ``[b, h, nk, d * bits / 8]`` (packed along channels), scale and
  zero ``[b, h, nk / group, d]``;
- quantised values: codes uint8 ``[b, h, nv, d * bits / 8]``, scale and zero
  ``[b, h, nv, d / group_v]`` where ``group_v = min(group, d)`` (a value group never spans two
  heads; the tiny test models have ``d = 16``);
- full-precision residual keys ``[b, h, n - nk, d]`` and values ``[b, h, n - nv, d]``;
- ``positions`` and side indexes as in :class:`~kvlab.engine.cache.LayerKV`.

Scales and zeros are stored in the model's dtype (fp16/bf16 on GPU, fp32 on CPU), as the
reference stores them in the activations' dtype. :meth:`KiviLayerKV.nbytes` counts all of it.

Eviction after the prefill (H2O, TOVA, ``decode_budget``) selects among quantised entries
without re-quantising, and a session's rollback is exact at the points where the engine marks
(see :class:`KiviLayerKV`).

Reading: ``keys`` / ``values`` dequantise the whole layer on every read (quantised part, then
the residual, in entry order): ``O(n * d)`` work and a transient full-precision copy per read
and layer, no more than dense attention over the layer costs anyway. No dequantised copy is
kept between reads, so the memory held is the packed memory that is reported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.cache import LayerKV
from kvlab.errors import RecipeError
from kvlab.quantize.base import QuantizeMethod
from kvlab.quantize.minmax import dequantize_minmax, pack_bits, quantize_minmax, unpack_bits
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class Kivi(QuantizeMethod):
    name: ClassVar[str] = "kivi"
    paper: ClassVar[str] = "Liu et al., KIVI, ICML 2024, arXiv:2402.02750"
    summary: ClassVar[str] = (
        "2/4-bit min-max KV: keys per channel, values per token; newest tokens in full precision."
    )

    bits: int = param(2, "bits per quantised number", choices=(2, 4))
    group: int = param(
        32, "group size: tokens per key group (per channel), channels per value group (per token)",
        min=1,
    )
    residual: int = param(128, "newest tokens kept in full precision (a multiple of group)", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.residual % self.group:
            lower = self.residual // self.group * self.group
            options = " or ".join(str(r) for r in (lower, lower + self.group) if r > 0)
            raise RecipeError(
                f"{self.name}(residual={self.residual}, group={self.group}): residual must be a "
                f"multiple of group, so that key groups are quantised whole (e.g. {options})"
            )

    def new_layer(self) -> KiviLayerKV:
        return KiviLayerKV(self.bits, self.group, self.residual)


class _Quantized:
    """Packed codes ``[b, h, n, d * bits / 8]`` with a scale and zero per group."""

    def __init__(self, bits: int, group: int, codes: Tensor, scale: Tensor, zero: Tensor) -> None:
        self.bits, self.group = bits, group
        self.codes, self.scale, self.zero = codes, scale, zero

    @property
    def num_entries(self) -> int:
        return self.codes.shape[2]

    def tensors(self) -> list[Tensor]:
        return [self.codes, self.scale, self.zero]


class QuantizedKeys(_Quantized):
    """Keys quantised per channel, ``group`` consecutive entries to a group.

    ``scale``, ``zero``: ``[b, h, groups, d]``. ``sizes``: ``None`` while every group holds
    ``group`` entries; after eviction int16 ``[b, h, groups]``, the entries left in each group
    (a kept entry still reads back with its group's scale, so eviction adds no error).
    """

    def __init__(self, bits: int, group: int, like: Tensor) -> None:
        b, h, _, d = like.shape
        super().__init__(
            bits, group, like.new_empty((b, h, 0, d * bits // 8), dtype=torch.uint8),
            like.new_empty((b, h, 0, d)), like.new_empty((b, h, 0, d)),
        )
        self.sizes: Tensor | None = None

    @property
    def num_groups(self) -> int:
        return self.scale.shape[2]

    def tensors(self) -> list[Tensor]:
        return super().tensors() + ([] if self.sizes is None else [self.sizes])

    def append(self, keys: Tensor) -> None:
        """Quantise ``keys`` ``[b, h, m, d]`` (``m`` a multiple of ``group``) and add them."""
        b, h, m, d = keys.shape
        groups = m // self.group
        grouped = keys.reshape(b, h, groups, self.group, d)
        codes, scale, zero = quantize_minmax(grouped, self.bits, dim=3)
        self.codes = torch.cat([self.codes, pack_bits(codes.reshape(b, h, m, d), self.bits)], dim=2)
        self.scale = torch.cat([self.scale, scale.squeeze(3)], dim=2)
        self.zero = torch.cat([self.zero, zero.squeeze(3)], dim=2)
        if self.sizes is not None:
            whole = self.sizes.new_full((b, h, groups), self.group)
            self.sizes = torch.cat([self.sizes, whole], dim=2)

    def dequantize(self) -> Tensor:
        """Keys ``[b, h, n, d]`` in the model's dtype."""
        codes = unpack_bits(self.codes, self.bits)
        b, h, n, d = codes.shape
        if self.sizes is None:
            grouped = codes.reshape(b, h, self.num_groups, self.group, d)
            keys = dequantize_minmax(grouped, self.scale[:, :, :, None], self.zero[:, :, :, None])
            return keys.reshape(b, h, n, d)
        index = self.group_of_entries()[..., None].expand(-1, -1, -1, d)
        return dequantize_minmax(codes, self.scale.gather(2, index), self.zero.gather(2, index))

    def group_of_entries(self) -> Tensor:
        """Group index ``[b, h, n]`` of every entry."""
        b, h = self.codes.shape[:2]
        entries = torch.arange(self.num_entries, device=self.codes.device).expand(b, h, -1)
        if self.sizes is None:
            return entries // self.group
        ends = self.sizes.long().cumsum(dim=-1)
        return torch.searchsorted(ends, entries.contiguous(), right=True)

    def take(self, rows: Tensor) -> None:
        """Keep the entries at ``rows`` ``[b, h, k]`` (sorted per row); groups that lose every
        entry in every row are dropped."""
        b, h, _ = rows.shape
        groups = self.group_of_entries().gather(2, rows)
        sizes = torch.zeros(b, h, self.num_groups, dtype=torch.long, device=rows.device)
        sizes.scatter_add_(2, groups, torch.ones_like(groups))
        used = sizes.sum(dim=(0, 1)).nonzero().squeeze(-1)
        self.codes = self.codes.gather(2, rows[..., None].expand(-1, -1, -1, self.codes.shape[-1]))
        self.scale = self.scale.index_select(2, used)
        self.zero = self.zero.index_select(2, used)
        self._set_sizes(sizes.index_select(2, used))

    def keep_prefix(self, entries: int, groups: int) -> None:
        """Keep the first ``entries`` entries, which fill the first ``groups`` groups."""
        self.codes = self.codes[:, :, :entries].clone()
        self.scale = self.scale[:, :, :groups].clone()
        self.zero = self.zero[:, :, :groups].clone()
        if self.sizes is not None:
            self._set_sizes(self.sizes[:, :, :groups])

    def _set_sizes(self, sizes: Tensor) -> None:
        whole = bool((sizes == self.group).all())
        self.sizes = None if whole else sizes.to(torch.int16).contiguous()


class QuantizedValues(_Quantized):
    """Values quantised per token, ``group`` channels to a group: ``scale``, ``zero``
    ``[b, h, n, d / group]``. Each entry is independent of the others."""

    def __init__(self, bits: int, group: int, like: Tensor) -> None:
        b, h, _, d = like.shape
        super().__init__(
            bits, group, like.new_empty((b, h, 0, d * bits // 8), dtype=torch.uint8),
            like.new_empty((b, h, 0, d // group)), like.new_empty((b, h, 0, d // group)),
        )

    def append(self, values: Tensor) -> None:
        """Quantise ``values`` ``[b, h, m, d]`` and add them."""
        b, h, m, d = values.shape
        grouped = values.reshape(b, h, m, d // self.group, self.group)
        codes, scale, zero = quantize_minmax(grouped, self.bits, dim=4)
        self.codes = torch.cat([self.codes, pack_bits(codes.reshape(b, h, m, d), self.bits)], dim=2)
        self.scale = torch.cat([self.scale, scale.squeeze(4)], dim=2)
        self.zero = torch.cat([self.zero, zero.squeeze(4)], dim=2)

    def dequantize(self) -> Tensor:
        """Values ``[b, h, n, d]`` in the model's dtype."""
        codes = unpack_bits(self.codes, self.bits)
        b, h, n, d = codes.shape
        grouped = codes.reshape(b, h, n, d // self.group, self.group)
        values = dequantize_minmax(grouped, self.scale[..., None], self.zero[..., None])
        return values.reshape(b, h, n, d)

    def take(self, rows: Tensor) -> None:
        """Keep the entries at ``rows`` ``[b, h, k]``."""
        self.codes, self.scale, self.zero = (
            t.gather(2, rows[..., None].expand(-1, -1, -1, t.shape[-1]))
            for t in (self.codes, self.scale, self.zero)
        )

    def keep_prefix(self, entries: int) -> None:
        self.codes, self.scale, self.zero = (
            t[:, :, :entries].clone() for t in (self.codes, self.scale, self.zero)
        )


@dataclass
class RestorePoint:
    """What brings a layer back to how it stood at ``entries`` entries.

    Quantised storage only grows at its end, so its lengths then (``key_entries``,
    ``key_groups``, ``value_entries``) recover it. The residual then held entries
    ``key_entries..entries`` (keys) and ``value_entries..entries`` (values); those still in
    the residual are read from it, and those a flush has quantised since are copied, in full
    precision, at the flush (``flushed_keys`` / ``flushed_values``, in entry order). A point
    therefore costs nothing until its entries are flushed, and at most one residual.
    """

    entries: int
    key_entries: int
    key_groups: int
    value_entries: int
    flushed_keys: list[Tensor] = field(default_factory=list)
    flushed_values: list[Tensor] = field(default_factory=list)


class KiviLayerKV(LayerKV):
    """One layer stored the KIVI way (see the module docstring for rules and layout).

    Until :meth:`end_prefill` it is a plain :class:`LayerKV` (compression selects among
    full-precision entries); ``end_prefill`` quantises. After it:

    - ``keys`` / ``values`` are read-only properties that dequantise ``[b, h, n, d]``;
    - :meth:`select` (eviction while decoding, e.g. H2O) is exact: kept entries keep their
      codes and their group's scale and zero. When heads keep different numbers of quantised
      entries, every head keeps the smallest count quantised and the others' extra kept
      quantised entries move to the residual as their dequantised values (no new error; a later
      flush quantises them again);
    - :meth:`truncate` (a session rolling back a request) is exact at *restore points*: the
      end of the prefill (or the latest selection after it: a retrieve method whose index
      moves entries out at the end of the context, ShadowKV and A2ATS, selects after the
      conversion) and the end of the latest multi-token append (a question's prefill),
      which is where the engine takes its marks. A flush copies the full-precision entries a
      restore point still needs before quantising them (they count in :meth:`nbytes`: nothing
      until a flush, at most one residual; one copy serves both points), as without a hook
      at ``KVCache.mark`` the layer cannot know whether a mark was taken. Elsewhere,
      truncation keeps the first ``num_entries`` entries as they are now stored (exact unless
      a flush quantised some of them after that count was reached).
    """

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128) -> None:
        self.bits, self.group, self.residual = bits, group, residual
        self._quantized_keys: QuantizedKeys | None = None  # None until end_prefill
        self._quantized_values: QuantizedValues | None = None
        self._residual_keys: Tensor | None = None
        self._residual_values: Tensor | None = None
        self._plain_keys: Tensor | None = None  # LayerKV's keys/values before end_prefill
        self._plain_values: Tensor | None = None
        self.restore_points: list[RestorePoint] = []
        super().__init__()

    # -- keys and values: LayerKV's attributes until end_prefill, dequantised after ---------
    @property
    def quantized(self) -> bool:
        return self._quantized_keys is not None

    @property
    def keys(self) -> Tensor | None:
        """``[b, h, n, d]``: quantised entries dequantised, then the full-precision residual."""
        if not self.quantized:
            return self._plain_keys
        return torch.cat([self._quantized_keys.dequantize(), self._residual_keys], dim=2)

    @keys.setter
    def keys(self, keys: Tensor | None) -> None:
        self._check_writable("keys")
        self._plain_keys = keys

    @property
    def values(self) -> Tensor | None:
        """``[b, h, n, d]``: quantised entries dequantised, then the full-precision residual."""
        if not self.quantized:
            return self._plain_values
        return torch.cat([self._quantized_values.dequantize(), self._residual_values], dim=2)

    @values.setter
    def values(self, values: Tensor | None) -> None:
        self._check_writable("values")
        self._plain_values = values

    def _check_writable(self, what: str) -> None:
        if self.quantized:
            raise AttributeError(
                f"KiviLayerKV.{what} is read-only once quantised (after end_prefill); "
                "change entries with append, select or truncate"
            )

    @property
    def num_entries(self) -> int:
        if not self.quantized:
            return super().num_entries
        return self._quantized_keys.num_entries + self._residual_keys.shape[2]

    @property
    def kv_heads(self) -> int:
        if not self.quantized:
            return super().kv_heads
        return self._residual_keys.shape[1]  # no dequantisation just to count heads

    @property
    def full_precision_entries(self) -> tuple[int, int]:
        """Entries held in full precision: ``(keys, values)``."""
        if not self.quantized:
            return self.num_entries, self.num_entries
        return self._residual_keys.shape[2], self._residual_values.shape[2]

    def key_positions(self) -> Tensor:
        if self.positions is not None or not self.quantized:
            return super().key_positions()
        return torch.arange(self.num_entries, device=self._residual_keys.device)

    # -- the lifecycle --------------------------------------------------------------------------
    def end_prefill(self) -> None:
        """Quantise: keys in whole residual blocks, values all but the newest ``residual``."""
        if self.quantized or self._plain_keys is None:
            return
        keys, values = self._plain_keys.clone(), self._plain_values.clone()  # drop any reserve
        head_dim = keys.shape[-1]
        value_group = min(self.group, head_dim)
        if head_dim % value_group or head_dim * self.bits % 8:
            raise RecipeError(
                f"kivi(group={self.group}, bits={self.bits}): head_dim {head_dim} cannot be split "
                f"into value groups of {value_group} channels packed into whole bytes; choose a "
                f"group that divides {head_dim}"
            )
        self._quantized_keys = QuantizedKeys(self.bits, self.group, keys)
        self._quantized_values = QuantizedValues(self.bits, value_group, values)
        self._residual_keys, self._residual_values = keys, values
        self._plain_keys = self._plain_values = None
        self._key_storage = self._value_storage = None
        self._settle()
        self.restore_points = [self._restore_point()]

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Add ``t`` entries ``[b, h, t, d]`` at ``positions`` ``[t]``: after the prefill they
        join the full-precision residual once the residual has been settled."""
        if not self.quantized:
            super().append(keys, values, positions)
            return
        self._settle()
        self._residual_keys = torch.cat([self._residual_keys, keys], dim=2)
        self._residual_values = torch.cat([self._residual_values, values], dim=2)
        self._append_positions(positions)
        if keys.shape[-2] > 1:  # a prompt chunk: the engine may mark here and roll back to it
            self.restore_points = [*self.restore_points[:1], self._restore_point()]

    def _settle(self) -> None:
        """Quantise a key residual of ``residual`` or more entries in whole blocks of
        ``residual``, and values beyond the ``residual`` newest, oldest first."""
        keys = self._residual_keys
        whole = keys.shape[2] // self.residual * self.residual
        if whole:
            self._keep_for_restore_points(keys[:, :, :whole], self._quantized_keys, "keys")
            self._quantized_keys.append(keys[:, :, :whole])
            self._residual_keys = keys[:, :, whole:].clone()
        values = self._residual_values
        over = values.shape[2] - self.residual
        if over > 0:
            self._keep_for_restore_points(values[:, :, :over], self._quantized_values, "values")
            self._quantized_values.append(values[:, :, :over])
            self._residual_values = values[:, :, over:].clone()

    def _keep_for_restore_points(self, flushed: Tensor, into: _Quantized, kind: str) -> None:
        """Copy the entries about to be quantised ``into`` (``flushed`` ``[b, h, m, d]``,
        entries ``start..start + m``) that a restore point held in full precision; one copy,
        shared by the points."""
        start = into.num_entries
        end = start + flushed.shape[2]
        spans = []
        for point in self.restore_points:
            first = point.key_entries if kind == "keys" else point.value_entries
            spans.append((point, max(start, first), min(end, point.entries)))
        wanted = [(point, a, b) for point, a, b in spans if a < b]
        if not wanted:
            return
        low, high = min(a for _, a, _ in wanted), max(b for _, _, b in wanted)
        copy = flushed[:, :, low - start : high - start].clone()
        for point, a, b in wanted:
            chunks = point.flushed_keys if kind == "keys" else point.flushed_values
            chunks.append(copy[:, :, a - low : b - low])

    def select(self, keep: Tensor) -> None:
        """Keep the entries at ``keep`` (``[k]`` or ``[b, h, k]``, sorted); after the prefill
        without re-quantising (see the class docstring)."""
        if not self.quantized:
            super().select(keep)
            return
        self.evictions += 1
        positions = self.key_positions()
        self._take(keep)
        self._select_positions(positions, keep)
        # entries were renumbered: no earlier state comes back, but this one may be marked
        # (a retrieve method's index moves entries out at the end of the context: ShadowKV)
        self.restore_points = [self._restore_point()]

    def truncate(self, num_entries: int, seen: int) -> None:
        """Drop entries from index ``num_entries`` on; exact at a restore point."""
        if not self.quantized:
            super().truncate(num_entries, seen)
            return
        point = next((p for p in self.restore_points if p.entries == num_entries), None)
        self.restore_points = [p for p in self.restore_points if p.entries <= num_entries]
        if point is not None:
            self._restore(point)
        else:
            self._take(torch.arange(num_entries, device=self._residual_keys.device))
        if self.positions is not None:
            self.positions = self.positions[..., :num_entries].clone()
        self.seen = seen
        for index in self.side.values():
            index.truncate(num_entries)

    def snapshot(self) -> dict:
        """A deep copy: quantised storage objects grow in place, so references would not do."""
        return copy.deepcopy(self.__dict__)

    def load_snapshot(self, state: dict) -> None:
        self.__dict__.update(copy.deepcopy(state))

    def drop_reserve(self) -> None:
        """Nothing to drop: a snapshot (and so a fork) is a deep copy."""

    def _restore_point(self) -> RestorePoint:
        return RestorePoint(
            entries=self.num_entries,
            key_entries=self._quantized_keys.num_entries,
            key_groups=self._quantized_keys.num_groups,
            value_entries=self._quantized_values.num_entries,
        )

    def _restore(self, point: RestorePoint) -> None:
        """Back to ``point``: cut the quantised storage to its lengths then, and rebuild the
        residual from the flushed copies and the part still held in full precision."""
        still_keys = max(0, point.entries - self._quantized_keys.num_entries)
        still_values = max(0, point.entries - self._quantized_values.num_entries)
        self._residual_keys = torch.cat(
            [*point.flushed_keys, self._residual_keys[:, :, :still_keys]], dim=2
        )
        self._residual_values = torch.cat(
            [*point.flushed_values, self._residual_values[:, :, :still_values]], dim=2
        )
        self._quantized_keys.keep_prefix(point.key_entries, point.key_groups)
        self._quantized_values.keep_prefix(point.value_entries)
        point.flushed_keys, point.flushed_values = [], []
        for earlier in self.restore_points:  # entries now back in the residual need no copy
            earlier.flushed_keys = _first_entries(
                earlier.flushed_keys, point.key_entries - earlier.key_entries
            )
            earlier.flushed_values = _first_entries(
                earlier.flushed_values, point.value_entries - earlier.value_entries
            )

    def _take(self, keep: Tensor) -> None:
        b, h = self._residual_keys.shape[:2]
        rows = keep if keep.dim() == 3 else keep.expand(b, h, -1)
        self._residual_keys = _take_entries(self._quantized_keys, self._residual_keys, rows)
        self._residual_values = _take_entries(self._quantized_values, self._residual_values, rows)

    def nbytes(self) -> int:
        """Packed codes, scales, zeros, full-precision residual, positions, side indexes and
        the flushed entries kept for restore points (each storage counted once)."""
        if not self.quantized:
            return super().nbytes()
        tensors = [
            *self._quantized_keys.tensors(), *self._quantized_values.tensors(),
            self._residual_keys, self._residual_values, self.positions,
        ]
        for point in self.restore_points:
            tensors += point.flushed_keys + point.flushed_values
        counted: set[int] = set()
        total = 0
        for tensor in tensors:
            if tensor is None or tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in counted:
                counted.add(storage.data_ptr())
                total += storage.nbytes()
        return total + sum(index.nbytes() for index in self.side.values())


def _first_entries(chunks: list[Tensor], count: int) -> list[Tensor]:
    """The first ``count`` entries of ``chunks`` (``[b, h, m_i, d]`` each, in order)."""
    kept = []
    for chunk in chunks:
        if count <= 0:
            break
        kept.append(chunk if chunk.shape[2] <= count else chunk[:, :, :count].clone())
        count -= chunk.shape[2]
    return kept


def _take_entries(quantized: _Quantized, residual: Tensor, rows: Tensor) -> Tensor:
    """Keep the entries ``rows`` ``[b, h, k]`` (sorted) of ``quantized`` followed by
    ``residual`` ``[b, h, r, d]``; returns the new residual. Every row keeps the same number of
    quantised entries: the fewest any row keeps; other rows' extra ones join the residual."""
    stored = quantized.num_entries
    still = int((rows < stored).sum(dim=-1).min()) if rows.numel() else 0
    rest = rows[..., still:]
    d = residual.shape[-1]
    if bool((rest >= stored).all()):
        new_residual = residual.gather(2, (rest - stored)[..., None].expand(-1, -1, -1, d))
    else:
        every = torch.cat([quantized.dequantize(), residual], dim=2)
        new_residual = every.gather(2, rest[..., None].expand(-1, -1, -1, d))
    quantized.take(rows[..., :still])
    return new_residual.contiguous()


__all__ = ["Kivi", "KiviLayerKV", "QuantizedKeys", "QuantizedValues", "RestorePoint"]
