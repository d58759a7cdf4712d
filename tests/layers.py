"""Small random layers for checking compress methods against references written out in tests."""

from __future__ import annotations

import torch

from kvlab.engine.attention import LayerContext
from kvlab.engine.cache import ForwardStep, LayerKV
from kvlab.engine.rotary import Rotary
from kvlab.position.base import TRAINED_ROPE


def rotary(d: int) -> Rotary:
    return Rotary(1.0 / 100 ** (torch.arange(0, d, 2).float() / d))


def random_layer(
    n: int = 60, d: int = 8, kv_heads: int = 2, query_heads: int = 4, batch: int = 1,
    seed: int = 0, index: int = 0, num_layers: int = 1, position=TRAINED_ROPE,
) -> tuple[LayerContext, torch.Tensor]:
    """A prefilled layer of ``n`` random entries (keys stored rotated unless ``position`` keeps
    them pre-RoPE) and the unrotated queries ``[batch, query_heads, n, d]`` of its tokens."""
    torch.manual_seed(seed)
    rot = rotary(d)
    raw = torch.randn(batch, kv_heads, n, d)
    keys = raw if position.stores_pre_rope else rot.rotate(raw, torch.arange(n))
    layer = LayerKV()
    layer.append(keys, torch.randn(batch, kv_heads, n, d), torch.arange(n))
    step = ForwardStep(
        torch.arange(n), rot, rotate_keys=not position.stores_pre_rope, building=True, compress=True
    )
    ctx = LayerContext(index, num_layers, layer, step, position, d**-0.5)
    return ctx, torch.randn(batch, query_heads, n, d)


def probs_of(q_row: torch.Tensor, q_pos: int, keys: torch.Tensor, rot: Rotary) -> torch.Tensor:
    """Causal softmax of one unrotated query ``[d]`` at ``q_pos`` over rotated ``keys`` ``[n, d]``
    (the keys' positions are 0..n-1)."""
    qr = rot.rotate(q_row[None, None, None], torch.tensor([q_pos]))[0, 0, 0]
    logits = keys @ qr / q_row.shape[-1] ** 0.5
    logits[q_pos + 1 :] = float("-inf")
    return torch.softmax(logits, dim=-1)
