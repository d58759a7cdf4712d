"""The one attention entry point, registered with transformers' ``AttentionInterface``.

Every attention layer of a model run by kvlab calls :func:`kvlab_attention`. It stores the
forward's new keys and values, then asks the recipe's methods, in lifecycle order, who
computes this call:

0. **reuse** — on a cache joined from documents encoded apart (APE), the question's and the
   generated tokens' attention over them (the recipe refuses the other stages' methods there);
1. **retrieve** — a decoding step (one query) may attend to a selected subset of the cache
   (and prompt tokens appended after the context, to entries its index moved out of storage);
2. **prefill** — a prompt forward on a layer nothing was evicted from may use a sparse pattern
   (a layer after a token-selective method's propagation holds only the propagated tokens);
   in a recipe without a prefill method, the retrieve method may select for a prompt
   forward instead (``attend_prefill``: TokenSelect's chunked prefill), since the prefill
   stage, when there is one, owns the prompt's attention;
3. otherwise dense attention over the layer's entries (head by head when the compress method
   left KV heads with different entries: :mod:`kvlab.engine.ragged`);

a sliding-window (local) layer (Gemma-3's) is none of the stages' business: it attends
densely over its window with RoPE as trained, then drops what left the window
(:class:`~kvlab.engine.cache.SlidingLayerKV`); the methods act on the global layers;

and then lets the **compress** method see every chunk of the context prefill (``observe``) and
every decoding step (``after_decode_step``), and shrink the layer at the end of that prefill,
where the **quantize** method converts what is kept, and the **retrieve** method builds its
index over the finished context (``end_context``). Attention itself is always computed by
the **position** method (it knows how to rotate q and k), through :meth:`LayerContext.attend`.

A forward that decodes one token of several sequences at once (a
:class:`~kvlab.engine.forward.BatchForward`) runs this order once per sequence, on its row of
the batch, its own cache and its own recipe (:func:`attend_sequence`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface

from kvlab.engine.forward import BatchForward, ForwardContext, Phase, StopForward
from kvlab.engine.kernels import window_allowed
from kvlab.engine.ragged import RaggedLayerKV, ragged_attention

ATTENTION_NAME = "kvlab"
FORWARD_KWARG = "kvlab"
"""The keyword argument of the model's forward that carries the :class:`ForwardContext`."""


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
    """transformers attention function: ``query`` ``[b, Hq, t, d]``, ``key`` / ``value``
    ``[b, Hk, t, d]`` arrive unrotated (the new tokens only). Returns ``[b, t, Hq, d]``."""
    forward = kwargs.get(FORWARD_KWARG)
    if isinstance(forward, BatchForward):  # one decoding step of several sequences
        outputs = [
            attend_sequence(module, query[i : i + 1], key[i : i + 1], value[i : i + 1], one, scaling)
            for i, one in enumerate(forward.forwards)
        ]
        return torch.cat(outputs, dim=0), None
    if not isinstance(forward, ForwardContext):
        raise RuntimeError(
            "the 'kvlab' attention runs only inside kvlab's engine (no ForwardContext was passed)"
        )
    return attend_sequence(module, query, key, value, forward, scaling), None


def attend_sequence(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, forward: ForwardContext,
    scaling: float | None,
) -> Tensor:
    """One sequence's attention in one layer (the stage order of the module docstring):
    ``query`` ``[1, Hq, t, d]``, ``key`` / ``value`` ``[1, Hk, t, d]``; returns ``[1, t, Hq, d]``."""
    recipe = forward.recipe
    forward.store(module.layer_idx, key, value)
    ctx = forward.layer_context(module.layer_idx, scaling if scaling is not None else module.scaling)
    if forward.stop_after == module.layer_idx:
        raise StopForward(query, ctx)  # a probe of the first layers ends here (Engine.probe_layer)
    layer = ctx.layer
    if layer.window is not None:  # a sliding-window layer: its window, no stage method
        k_pos = layer.key_positions()
        allowed = window_allowed(ctx.positions, k_pos, layer.window)
        out = ctx.attend(query, ctx.positions, layer.keys, k_pos, layer.values, allowed)
        layer.slide()
        return out.transpose(1, 2).contiguous()
    decoding = query.shape[2] == 1 and ctx.phase is Phase.DECODE
    out: Tensor | None = None
    if recipe.reuse is not None:  # joined documents (APE): the reuse method owns their attention
        out = recipe.reuse.attend(query, ctx)  # (a recipe with one has no prefill or retrieve method)
    elif decoding and recipe.retrieve is not None:
        out = recipe.retrieve.attend(query, ctx)
    elif ctx.phase is Phase.APPEND and recipe.retrieve is not None:
        out = recipe.retrieve.attend_appended(query, ctx)
    if out is None and ctx.phase.is_prefill:
        if recipe.prefill is not None:  # the prefill stage owns the prompt's attention
            if not ctx.layer.evictions:
                out = recipe.prefill.attend(query, ctx)
        elif recipe.retrieve is not None:
            out = recipe.retrieve.attend_prefill(query, ctx)
    if out is None:
        if isinstance(layer, RaggedLayerKV) and layer.is_ragged:
            out = ragged_attention(query, ctx.positions, layer, ctx.attend)
        else:
            out = ctx.attend(query, ctx.positions, layer.keys, layer.key_positions(), layer.values)
    if recipe.retrieve is not None and ctx.phase.observed:
        recipe.retrieve.observe(query, ctx)
    if recipe.compress is not None:
        if ctx.phase.observed:
            recipe.compress.observe(query, ctx)
        elif decoding:
            recipe.compress.after_decode_step(query, ctx)
    if ctx.phase.ends_context:
        if recipe.compress is not None:
            recipe.compress.compress(query, ctx)
        if recipe.quantize is not None:
            recipe.quantize.convert(query, ctx)
        else:
            ctx.layer.end_prefill()
        if recipe.retrieve is not None:
            recipe.retrieve.end_context(query, ctx)
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(ATTENTION_NAME, kvlab_attention)
