"""Asymmetric min-max quantisation and bit packing: the arithmetic every KV quantiser shares.

A group of numbers ``x`` is stored as integer codes ``c = round((x - zero) / scale)`` in
``[0, 2**bits - 1]`` with ``zero = min(x)`` and ``scale = (max(x) - min(x)) / (2**bits - 1)``;
it reads back as ``c * scale + zero``, within ``scale / 2`` of ``x`` per element.
Codes are packed ``8 // bits`` to a byte along the last axis (the lowest bits hold the first
code), so the bytes a cache reports are the bytes it holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

PACKABLE_BITS = (1, 2, 4, 8)


def quantize_minmax(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise ``x`` with one scale and zero per slice along ``dim`` (the group axis).

    Returns ``codes`` (uint8, the shape of ``x``) and ``scale``, ``zero`` (``x``'s dtype, ``dim``
    kept with size 1). The statistics are taken in float32; the codes are computed from the
    scale and zero as stored, so the error bound holds for what is read back.
    """
    top = 2**bits - 1
    xf = x.float()
    low, high = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    scale = ((high - low) / top).to(x.dtype)
    zero = low.to(x.dtype)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()  # a constant group
    codes = torch.round((xf - zero.float()) / safe).clamp_(0, top).to(torch.uint8)
    return codes, scale, zero


def dequantize_minmax(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``codes * scale + zero`` in the dtype of ``scale`` (broadcasting)."""
    return torch.addcmul(zero, codes.to(scale.dtype), scale)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``codes`` ``[..., m]`` (each < 2**bits) into bytes ``[..., m * bits // 8]``."""
    per_byte = 8 // bits
    if bits not in PACKABLE_BITS or codes.shape[-1] % per_byte:
        raise ValueError(f"cannot pack {codes.shape[-1]} {bits}-bit codes into whole bytes")
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes ``[..., m]`` from ``[..., m * bits // 8]``."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * len(shifts))  # also when empty


__all__ = ["quantize_minmax", "dequantize_minmax", "pack_bits", "unpack_bits"]
