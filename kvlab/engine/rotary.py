"""Rotary control: the one place where kvlab applies RoPE.

kvlab takes RoPE out of the model's hands: the model's rotary module is replaced by
:class:`DeferredRotary`, which hands q and k over *unrotated* (cos = 1, sin = 0). The engine
then rotates keys when they are stored (or keeps them pre-RoPE when a position method needs to
re-position them) and rotates queries at attention time, always through :class:`Rotary`.
Frequencies come from transformers' own ``ROPE_INIT_FUNCTIONS``, so a drop-in position method
only changes the rope parameters, exactly as a config change would.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


_TABLE_FROM = 256
"""Integer positions from which :meth:`Rotary.cos_sin` reads the position table."""


class Rotary:
    """RoPE in transformers' layout: channel ``i`` is paired with ``i + d/2``.

    ``inv_freq`` is ``[d/2]``; ``attention_factor`` multiplies cos and sin (YaRN's mscale);
    ``trained_length`` is the model's trained context ``L0`` (None: unknown), for position
    methods whose positions are defined relative to it (DCA's chunks, ReRoPE's log scaling);
    ``seq_len`` is the sequence length at the end of the forward the rotary was made for, set
    only by a method that asks for a new rotary at every length (LaMPE's mapping), else None.
    """

    def __init__(
        self, inv_freq: Tensor, attention_factor: float = 1.0, trained_length: int | None = None,
        seq_len: int | None = None,
    ) -> None:
        self.inv_freq = inv_freq.float()
        self.attention_factor = float(attention_factor)
        self.trained_length = trained_length
        self.seq_len = seq_len
        self._table: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin for ``positions`` of any shape ``[...]``: each ``[..., d]`` in ``dtype``.
        Many integer positions (a retrieve method re-positioning thousands of keys per layer
        and step) are read from a table of every position up to the largest, kept across
        calls, with the same values the direct computation gives (cos is even, sin odd)."""
        if positions.numel() >= _TABLE_FROM and not positions.dtype.is_floating_point:
            cos, sin = self._lookup(positions)
        else:
            freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        return (cos * self.attention_factor).to(dtype), (sin * self.attention_factor).to(dtype)

    def _lookup(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 cos and sin ``[..., d]`` of integer ``positions`` from the position table."""
        magnitude = positions.abs()
        needed = int(magnitude.max()) + 1
        table = self._table.get(positions.device)
        if table is None or table[0].shape[0] < needed:
            size = max(needed, 2 * (0 if table is None else table[0].shape[0]), 4096)
            freqs = torch.arange(size, device=positions.device).float()[:, None] * self.inv_freq.to(positions.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            table = self._table[positions.device] = (emb.cos(), emb.sin())
        flat = magnitude.reshape(-1)
        cos = table[0].index_select(0, flat).view(*positions.shape, -1)
        sin = table[1].index_select(0, flat).view(*positions.shape, -1)
        sign = torch.where(positions < 0, -1.0, 1.0).to(sin.dtype)[..., None]
        return cos, sin * sign

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` ``[b, heads, n, d]`` by ``positions`` ``[n]`` or ``[b, heads, n]``."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return apply_rotation(x, cos, sin)

    def pinned(self, positions: Tensor) -> Rotary:
        """This rotary for one forward: cos and sin of ``positions`` (that very tensor, which
        the forward owns and nobody modifies) are computed once and shared by every layer's
        keys and queries; any other positions are computed as usual."""
        return PinnedRotary(self, positions)


class PinnedRotary(Rotary):
    """A :class:`Rotary` that computes the cos and sin of one forward's positions once."""

    def __init__(self, base: Rotary, positions: Tensor) -> None:
        self.inv_freq = base.inv_freq
        self.attention_factor = base.attention_factor
        self.trained_length = base.trained_length
        self.seq_len = base.seq_len
        self._table = base._table  # the position table outlives the forward
        self.positions = positions
        self._tables: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if positions is not self.positions:
            return super().cos_sin(positions, dtype)
        if dtype not in self._tables:
            self._tables[dtype] = super().cos_sin(positions, dtype)
        return self._tables[dtype]

    def pinned(self, positions: Tensor) -> Rotary:
        return self if positions is self.positions else PinnedRotary(self, positions)


def rotate_half(x: Tensor) -> Tensor:
    """RoPE's pairing in transformers' layout: ``(x1, x2) -> (-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotation(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin``: RoPE by given cos and sin (linear in both, so an
    average of rotations is applied the same way)."""
    return x * cos + rotate_half(x) * sin


def rope_frequencies(
    config: Any, rope_parameters: dict[str, Any] | None = None, seq_len: int | None = None
) -> tuple[Tensor, float]:
    """Inverse frequencies and attention factor for ``config``, optionally with other rope
    parameters, computed by transformers' ``ROPE_INIT_FUNCTIONS`` (the default RoPE is
    ``base ** (-2i/d)``)."""
    if rope_parameters is not None:
        config = copy.copy(config)  # shallow: only rope_parameters is replaced
        merged = dict(config.rope_parameters or {})
        merged.update(rope_parameters)
        config.rope_parameters = merged
    params = config.rope_parameters or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = head_dim(config)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # heavy: only when needed

    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len)


def layer_type_config(config: Any, layer_type: str) -> Any:
    """``config`` as seen by the layers of ``layer_type`` (``"full_attention"``,
    ``"sliding_attention"``): a model with rope parameters per layer type (Gemma-3: the
    global layers' ``rope_theta`` and scaling, the local layers' ``rope_local_base_freq``)
    gets a shallow copy holding that type's parameters alone, which
    :func:`rope_frequencies` and transformers' ``ROPE_INIT_FUNCTIONS`` read as a model with
    one kind of layer; any other config is returned as is."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not isinstance(params.get(layer_type), dict):
        return config
    view = copy.copy(config)
    view.rope_parameters = dict(params[layer_type])
    return view


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DeferredRotary(nn.Module):
    """Stands in for the model's rotary module: cos = 1 and sin = 0, so the model's attention
    layers pass q and k through unrotated and kvlab rotates them itself (see module doc)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor, position_ids: Tensor, layer_type: str | None = None) -> tuple[Tensor, Tensor]:
        """Identity rotation for any ``layer_type`` (models with rope per layer type ask per type)."""
        shape = (*position_ids.shape, self.dim)
        return (
            torch.ones(shape, dtype=x.dtype, device=x.device),
            torch.zeros(shape, dtype=x.dtype, device=x.device),
        )
