"""The one attention entry point, registered with transformers' ``AttentionInterface``.

Every attention layer of a model run by kvlab calls :func:`kvlab_attention`. It asks the
recipe's methods, in lifecycle order, who computes this call:

1. **retrieve** — a decoding step (one query) may attend to a selected subset of the cache;
2. **prefill** — a prompt forward on an uncompressed layer may use a sparse pattern;
3. otherwise dense attention over the layer's entries (head by head when the compress method
   left KV heads with different entries: :mod:`kvlab.engine.ragged`);

and then lets the **compress** method see every chunk of the context prefill (``observe``) and
every decoding step (``after_decode_step``), and shrink the layer at the end of that prefill.
Attention itself is always computed by the **position** method (it knows how to rotate q and
k), through :meth:`LayerContext.attend`, on the keys the other stages chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

from kvlab.engine.cache import ForwardStep, KVCache, LayerKV
from kvlab.engine.ragged import RaggedLayerKV, ragged_attention

if TYPE_CHECKING:
    from kvlab.position.base import PositionMethod

ATTENTION_NAME = "kvlab"


def causal_allowed(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Boolean mask, True where key position <= query position.

    ``q_pos`` ``[t]``; ``k_pos`` ``[n]`` or ``[batch, heads, n]`` -> ``[t, n]`` or
    ``[batch, heads, t, n]``.
    """
    return k_pos[..., None, :] <= q_pos[:, None]


def expand_heads(mask: Tensor, query_heads: int) -> Tensor:
    """Broadcast a per-KV-head mask ``[b, kv_heads, t, n]`` to the query heads (GQA)."""
    if mask.dim() == 4 and mask.shape[1] not in (1, query_heads):
        mask = mask.repeat_interleave(query_heads // mask.shape[1], dim=1)
    return mask


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, scaling: float, allowed: Tensor | None, is_causal: bool = False
) -> Tensor:
    """Exact softmax attention of rotated ``q`` ``[b, Hq, t, d]`` over rotated ``k``/``v``
    ``[b, Hk, n, d]`` (``Hq`` a multiple of ``Hk``). ``allowed`` is a boolean mask or None."""
    if allowed is not None:
        allowed = expand_heads(allowed, q.shape[1])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, is_causal=is_causal, scale=scaling,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def masked_logits(
    q: Tensor, k: Tensor, scaling: float, allowed: Tensor | None
) -> Tensor:
    """fp32 logits ``[b, Hq, t, n]`` of rotated q and k, -inf where not allowed (GQA aware)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if allowed is not None:
        logits = logits.masked_fill(~expand_heads(allowed, q.shape[1]), float("-inf"))
    return logits


@dataclass
class LayerContext:
    """Everything a method needs to act on one layer during one forward."""

    index: int
    num_layers: int
    layer: LayerKV
    step: ForwardStep
    position: PositionMethod
    scaling: float
    prepared: dict[str, Any] = field(default_factory=dict)
    """What the recipe's methods computed once per model (:meth:`Method.prepare`), by stage."""

    def attend(
        self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, values: Tensor,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """Exact attention of unrotated queries ``q`` ``[b, Hq, t, d]`` at ``q_pos`` over stored
        keys at ``k_pos``, causal by position, restricted further by ``allowed``."""
        return self.position.attend(
            q, q_pos, keys, k_pos, values, self.step.rotary, self.scaling, allowed
        )

    def logits(self, q: Tensor, q_pos: Tensor) -> Tensor:
        """fp32 causal logits ``[b, Hq, t, n]`` of unrotated queries over the whole layer."""
        layer = self.layer
        return self.position.logits(
            q, q_pos, layer.keys, layer.key_positions(), self.step.rotary, self.scaling
        )


def kvlab_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: ``query`` ``[b, Hq, t, d]`` arrives unrotated; the new
    keys and values are already stored in the layer. Returns ``[b, t, Hq, d]``."""
    cache = kwargs.get("kvlab_cache")
    if not isinstance(cache, KVCache) or cache.recipe is None or cache.step is None:
        raise RuntimeError(
            "the 'kvlab' attention runs only inside kvlab's engine (no kvlab_cache was passed)"
        )
    from kvlab.position.base import TRAINED_ROPE

    recipe = cache.recipe
    ctx = LayerContext(
        index=module.layer_idx,
        num_layers=len(cache.layers),
        layer=cache.layers[module.layer_idx],
        step=cache.step,
        position=recipe.position or TRAINED_ROPE,
        scaling=scaling if scaling is not None else module.scaling,
        prepared=cache.prepared,
    )
    out: Tensor | None = None
    if query.shape[2] == 1 and recipe.retrieve is not None:
        out = recipe.retrieve.attend(query, ctx)
    elif ctx.step.building and recipe.prefill is not None and ctx.layer.is_contiguous:
        out = recipe.prefill.attend(query, ctx)
    if out is None:
        layer = ctx.layer
        if isinstance(layer, RaggedLayerKV) and layer.is_ragged:
            out = ragged_attention(query, ctx.step.positions, layer, ctx.attend)
        else:
            out = ctx.attend(query, ctx.step.positions, layer.keys, layer.key_positions(), layer.values)
    if recipe.compress is not None:
        if ctx.step.compressing:
            recipe.compress.observe(query, ctx)
        elif query.shape[2] == 1 and not ctx.step.building:
            recipe.compress.after_decode_step(query, ctx)
    if ctx.step.compress:  # the end of the context prefill
        if recipe.compress is not None:
            recipe.compress.compress(query, ctx)
        if recipe.quantize is not None:
            recipe.quantize.convert(query, ctx)
        else:
            ctx.layer.end_prefill()
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, kvlab_attention)
