"""The block-sparse kernel the dynamic sparse prefill methods share.

A method chooses, per query head and per block of ``block`` consecutive queries of the forward,
a set of key blocks (absolute key positions ``[kb * block, (kb + 1) * block)``), as a boolean
block mask ``[b, Hq, query_blocks, key_blocks]``; :func:`block_sparse_attention` gathers the
chosen key and value blocks of each query block and attends over them only (causal by
position inside the gathered set), heads and query blocks batched. Query blocks are taken in
groups whose gathered keys fit ``budget`` elements, so memory is bounded by the widest set a
query block gathers, never by ``n x n``. The block mask itself is ``(n / block)^2``.

Also here: :func:`rotated` (the forward's rotated queries and the layer's rotated keys, for the
estimates), :func:`dense_tail` (the last rows of a forward computed densely, the rest by a
sparse pattern) and :func:`causal_blocks` (which key blocks hold a key at or before each query
block's last query).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.position.base import PositionMethod

BUDGET = 1 << 24  # gathered key elements (b * Hq * keys * d) per group of query blocks


def supported(ctx: LayerContext) -> bool:
    """The kernel attends with the rotary's plain RoPE; position methods with their own
    attention arithmetic (e.g. Self-Extend) fall back to dense attention."""
    return type(ctx.position).attend is PositionMethod.attend


def rotated(q: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor, Tensor]:
    """Rotated queries ``[b, Hq, t, d]``, and the layer's rotated keys and its values at their
    KV heads, ``[b, Hk, n, d]`` (GQA: never copied per query head)."""
    layer = ctx.layer
    keys = layer.keys
    if ctx.position.stores_pre_rope:
        keys = ctx.rotary.rotate(keys, layer.key_positions())
    return ctx.rotary.rotate(q, ctx.positions), keys, layer.values


def query_block_bounds(q_pos: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """First and last position of each block of ``block`` consecutive queries."""
    starts = q_pos[::block]
    ends = q_pos[torch.clamp(torch.arange(block - 1, q_pos.numel() + block - 1, block), max=q_pos.numel() - 1)]
    return starts, ends[: starts.numel()]


def causal_blocks(q_pos: Tensor, n: int, block: int) -> Tensor:
    """``[query_blocks, key_blocks]``: True where the key block starts at or before the query
    block's last query."""
    _, ends = query_block_bounds(q_pos, block)
    starts = torch.arange(0, n, block, device=q_pos.device)
    return starts[None, :] <= ends[:, None]


def block_sparse_attention(
    q: Tensor, keys: Tensor, values: Tensor, q_pos: Tensor, blocks: Tensor, scaling: float,
    block: int, budget: int = BUDGET, count: Callable[[Tensor], None] | None = None,
    columns: Tensor | None = None,
) -> Tensor:
    """Attention ``[b, Hq, t, d]`` of rotated ``q`` over the key blocks ``blocks``
    ``[b, Hq, ceil(t / block), ceil(n / block)]`` selects, from rotated ``keys``/``values``
    ``[b, Hk, n, d]`` (key index = position; query head ``h`` reads KV head ``h // (Hq / Hk)``),
    causal by position, and over the single key ``columns`` ``[b, Hq, V]`` where given (each
    query attends to the columns at or before it that its blocks do not hold: MInference's
    vertical lines, gathered one by one). Every query must have at least one allowed key (the
    diagonal block guarantees it). ``count`` (:meth:`LayerContext.count_pairs`) receives the
    query-key pairs computed, padding left out."""
    b, h, t, d = q.shape
    n, group = keys.shape[2], h // keys.shape[1]
    nqb = blocks.shape[2]
    pad = nqb * block - t
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        q_pos = torch.cat([q_pos, q_pos[-1:].expand(pad)])
    counts = blocks.sum(-1)  # [b, h, nqb]
    order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
    offsets = torch.arange(block, device=q.device)
    key_pad = -n % block
    nkb = (n + key_pad) // block
    # one row per key block, [b * Hk * nkb, block * d]: a chosen block is one index_select row
    key_blocks = F.pad(keys, (0, 0, 0, key_pad)).reshape(-1, block * d)
    value_blocks = F.pad(values, (0, 0, 0, key_pad)).reshape(-1, block * d)
    batch = torch.arange(b, device=q.device)[:, None, None, None]
    head = (torch.arange(h, device=q.device) // group)[None, :, None, None]
    first_row = (batch * keys.shape[1] + head) * nkb  # [b, h, 1, 1]: the head's first key block
    width = 0
    if columns is not None:
        width = columns.shape[-1]
        column_keys = keys[batch[..., 0], head[..., 0], columns]  # [b, h, V, d]
        column_values = values[batch[..., 0], head[..., 0], columns]
        column_block = columns // block
    outputs = []
    start = 0
    while start < nqb:
        widest = int(counts[:, :, start].max())
        stop = start + 1
        while stop < nqb:
            wider = max(widest, int(counts[:, :, stop].max()))
            if (stop + 1 - start) * (wider * block + width) * b * h * d > budget:
                break
            widest, stop = wider, stop + 1
        chosen = order[:, :, start:stop, :widest]  # [b, h, g, s]
        valid = torch.gather(blocks[:, :, start:stop], -1, chosen)
        tokens = (chosen[..., None] * block + offsets).flatten(-2)  # [b, h, g, s * block]
        valid = valid[..., None].expand(*valid.shape, block).flatten(-2) & (tokens < n)
        g = stop - start
        rows_index = (first_row + chosen).flatten()
        k = key_blocks.index_select(0, rows_index).view(b, h, g, -1, d)  # whole blocks
        v = value_blocks.index_select(0, rows_index).view(b, h, g, -1, d)
        if columns is not None:  # the columns no chosen block holds, for every query block
            held = torch.gather(blocks[:, :, start:stop], -1, column_block[:, :, None, :].expand(-1, -1, g, -1))
            tokens = torch.cat([tokens, columns[:, :, None, :].expand(-1, -1, g, -1)], dim=-1)
            valid = torch.cat([valid, ~held], dim=-1)
            k = torch.cat([k, column_keys[:, :, None].expand(-1, -1, g, -1, -1)], dim=3)
            v = torch.cat([v, column_values[:, :, None].expand(-1, -1, g, -1, -1)], dim=3)
        rows = q_pos[start * block : stop * block].view(g, block)
        allowed = valid[..., None, :] & (tokens[..., None, :] <= rows[None, None, :, :, None])
        qg = q[:, :, start * block : stop * block].view(b, h, g, block, d)
        # 4-D, so that torch's fused CPU kernel (not the math fallback) takes the mask
        out = F.scaled_dot_product_attention(
            qg.reshape(b * h, g, block, d), k.reshape(b * h, g, -1, d), v.reshape(b * h, g, -1, d),
            attn_mask=allowed.view(b * h, g, block, -1), scale=scaling,
        )
        if count is not None:  # per key: the block's real rows (consecutive positions) at or after it
            real = (torch.arange(start * block, stop * block, device=q.device) < t).view(g, block).sum(-1)
            after = (rows[:, -1, None] - tokens + 1).clamp(min=0)  # padding repeats the last row
            count(torch.where(valid, torch.minimum(after, real[:, None]), 0).sum())
        outputs.append(out.view(b, h, g, block, d))
        start = stop
    return torch.cat(outputs, 2).flatten(2, 3)[:, :, :t]


def widest_gathered(blocks: Tensor, block: int) -> int:
    """The most keys one query block gathers (what bounds the kernel's memory)."""
    return int(blocks.sum(-1).max()) * block


def dense_tail(
    q: Tensor, ctx: LayerContext, last: int, sparse: Callable[[Tensor, LayerContext], Tensor]
) -> Tensor:
    """The forward's last ``last`` query rows attend densely; the rows before them by
    ``sparse(q_head, ctx_head)`` (the same layer, the head rows' positions)."""
    t = q.shape[2]
    cut = max(0, t - last)
    if cut == t:
        return sparse(q, ctx)
    layer = ctx.layer
    tail = ctx.attend(q[:, :, cut:], ctx.positions[cut:], layer.keys, layer.key_positions(), layer.values)
    if cut == 0:
        return tail
    head = sparse(q[:, :, :cut], dataclasses.replace(ctx, positions=ctx.positions[:cut]))
    return torch.cat([head, tail], dim=2)


__all__ = [
    "block_sparse_attention", "causal_blocks", "dense_tail", "query_block_bounds", "rotated",
    "supported", "widest_gathered",
]
