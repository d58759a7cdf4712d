"""Small random layers for checking compress methods against references written out in tests."""

from __future__ import annotations

import torch

from kvlab.engine.cache import LayerKV
from kvlab.engine.context import LayerContext, Phase
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
    ctx = layer_context(layer, torch.arange(n), rot, index, num_layers, position)
    return ctx, torch.randn(batch, query_heads, n, d)


def layer_context(
    layer: LayerKV, positions: torch.Tensor, rot: Rotary, index: int = 0, num_layers: int = 1,
    position=TRAINED_ROPE, phase: Phase = Phase.CONTEXT_END,
) -> LayerContext:
    """The context a method sees in layer ``index`` of a forward of tokens at ``positions``
    (by default the last chunk of a context prefill), scaling ``d ** -0.5``."""
    d = layer.keys.shape[-1] if layer.keys is not None else rot.inv_freq.shape[0] * 2
    return LayerContext(index, num_layers, layer, positions, rot, position, d**-0.5, phase)


def probs_of(q_row: torch.Tensor, q_pos: int, keys: torch.Tensor, rot: Rotary) -> torch.Tensor:
    """Causal softmax of one unrotated query ``[d]`` at ``q_pos`` over rotated ``keys`` ``[n, d]``
    (the keys' positions are 0..n-1)."""
    qr = rot.rotate(q_row[None, None, None], torch.tensor([q_pos]))[0, 0, 0]
    logits = keys @ qr / q_row.shape[-1] ** 0.5
    logits[q_pos + 1 :] = float("-inf")
    return torch.softmax(logits, dim=-1)
