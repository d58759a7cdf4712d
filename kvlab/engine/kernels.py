"""Attention arithmetic shared by every stage: causal masks, dense attention, logits.

Plain functions of tensors (no model, no cache, no recipe): the position stage computes
attention with them, and the methods of the other stages score entries with them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_allowed(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Boolean mask, True where key position <= query position.

    ``q_pos`` ``[t]``; ``k_pos`` ``[n]`` or ``[batch, heads, n]`` -> ``[t, n]`` or
    ``[batch, heads, t, n]``.
    """
    return k_pos[..., None, :] <= q_pos[:, None]


def window_allowed(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor | None:
    """Boolean mask ``[t, n]``, True where the key at ``k_pos`` ``[n]`` is among the last
    ``window`` tokens of the query at ``q_pos`` ``[t]`` (``q - k < window``, the query itself
    included: transformers' ``sliding_window_overlay``); None when every key is (a decoding
    step over a sliding-window layer's cache). Combine with :func:`causal_mask`."""
    if int(q_pos[-1]) - int(k_pos[0]) < window:
        return None
    return k_pos[None, :] > q_pos[:, None] - window


def _is_arange(pos: Tensor) -> bool:
    """``pos`` ``[n]`` is ``start, start + 1, ..., start + n - 1``."""
    n = pos.numel()
    return n > 0 and int(pos[-1]) - int(pos[0]) == n - 1 and bool((pos[1:] > pos[:-1]).all())


_CHUNK_MASKS: dict[tuple[Any, ...], Tensor] = {}
_CHUNK_MASK_BYTES = 64 * 2**20  # masks larger than this are built per call, never kept


def chunk_mask(q_start: int, t: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive mask ``[t, n]`` (0 allowed, -inf not) of queries at ``q_start .. q_start + t``
    over keys at ``0 .. n``: a prefill chunk over the whole cache. Every layer of a forward
    asks for the same one, so the last two are kept (when small), and SDPA gets a float
    mask it adds as is (a boolean one it converts on every call)."""
    key = (q_start, t, n, dtype, device)
    mask = _CHUNK_MASKS.get(key)
    if mask is None:
        q = torch.arange(q_start, q_start + t, device=device)
        allowed = torch.arange(n, device=device)[None, :] <= q[:, None]
        mask = torch.zeros(t, n, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        if t * n * mask.element_size() <= _CHUNK_MASK_BYTES:
            while len(_CHUNK_MASKS) >= 2:
                _CHUNK_MASKS.pop(next(iter(_CHUNK_MASKS)))
            _CHUNK_MASKS[key] = mask
    return mask


def causal_mask(
    q_pos: Tensor, k_pos: Tensor, allowed: Tensor | None, dtype: torch.dtype | None = None
) -> tuple[Tensor | None, bool]:
    """The mask for attention of queries at ``q_pos`` over keys at ``k_pos``: returns
    ``(mask, is_causal)`` and avoids building a mask where none is needed. With ``dtype``, a
    prefill chunk over a whole contiguous cache gets the float mask of :func:`chunk_mask`
    (else a boolean one)."""
    if q_pos.numel() == 1:  # a decoding step: every stored key is at or before the query
        return allowed, False
    if allowed is None:
        if int(k_pos.max()) <= int(q_pos.min()):
            return None, False
        if k_pos.dim() == 1 and k_pos.shape == q_pos.shape and torch.equal(k_pos, q_pos):
            return None, True
        if (dtype is not None and k_pos.dim() == 1 and q_pos.dim() == 1 and int(k_pos[0]) == 0
                and _is_arange(k_pos) and _is_arange(q_pos)):
            start, t, n = int(q_pos[0]), q_pos.numel(), k_pos.numel()
            return chunk_mask(start, t, n, dtype, q_pos.device), False
    mask = causal_allowed(q_pos, k_pos)
    if allowed is not None:
        mask = mask & allowed
    return mask, False


def expand_heads(mask: Tensor, query_heads: int) -> Tensor:
    """Broadcast a per-KV-head mask ``[b, kv_heads, t, n]`` to the query heads (GQA)."""
    if mask.dim() == 4 and mask.shape[1] not in (1, query_heads):
        mask = mask.repeat_interleave(query_heads // mask.shape[1], dim=1)
    return mask


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, scaling: float, allowed: Tensor | None, is_causal: bool = False
) -> Tensor:
    """Exact softmax attention of rotated ``q`` ``[b, Hq, t, d]`` over rotated ``k``/``v``
    ``[b, Hk, n, d]`` (``Hq`` a multiple of ``Hk``). ``allowed`` is a boolean mask, an
    additive float mask in q's dtype (:func:`chunk_mask`) or None."""
    if q.shape[2] == 1 and not is_causal and q.device.type == "cpu" and q.dtype == torch.float32:
        return decode_attention(q, k, v, scaling, allowed)
    if allowed is not None:
        allowed = expand_heads(allowed, q.shape[1])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, is_causal=is_causal, scale=scaling,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def decode_attention(q: Tensor, k: Tensor, v: Tensor, scaling: float, allowed: Tensor | None) -> Tensor:
    """Exact attention of one query row per head, ``q`` ``[b, Hq, 1, d]``, over ``k``/``v``
    ``[b, Hk, n, d]``, as two matrix products per KV head with its group of query heads
    stacked as the rows (``[g, d] @ [d, n]``, then ``[g, n] @ [n, d]``): each key and value is
    read once per step, not once per query head. On a CPU in float32 this reads the cache ~1.9x
    faster than ``scaled_dot_product_attention``'s flash kernel for one query (measured at
    4k-16k entries, 1 thread: benchmarks/README.md, "Time vs length"). ``allowed``: boolean or
    additive float, broadcastable to ``[b, Hq, 1, n]`` or per KV head ``[b, Hk, 1, n]``."""
    b, hq, _, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    group = hq // hk
    logits = torch.matmul(q.reshape(b, hk, group, d), k.transpose(-1, -2)).mul_(scaling)  # [b, Hk, g, n]
    if allowed is not None:
        if allowed.dim() == 4 and allowed.shape[1] == hq and group > 1:
            allowed = allowed.reshape(allowed.shape[0], hk, group, n)
        if allowed.dtype == torch.bool:
            logits.masked_fill_(~allowed, float("-inf"))
        else:
            logits.add_(allowed)
    probs = torch.softmax(logits, dim=-1)
    if allowed is not None:
        probs.nan_to_num_(0.0)  # a row with no allowed key attends to nothing (as SDPA: zeros)
    return torch.matmul(probs, v).reshape(b, hq, 1, d)


def masked_logits(
    q: Tensor, k: Tensor, scaling: float, allowed: Tensor | None
) -> Tensor:
    """fp32 logits ``[b, Hq, t, n]`` of rotated q and k, -inf where not allowed (GQA aware:
    each KV head's keys are multiplied once with its group's query rows stacked, not copied
    per query head)."""
    b, hq, t, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    grouped = q.float().reshape(b, hk, (hq // hk) * t, d)
    logits = torch.matmul(grouped, k.float().transpose(-1, -2)).view(b, hq, t, n).mul_(scaling)
    if allowed is not None:
        logits = logits.masked_fill(~expand_heads(allowed, q.shape[1]), float("-inf"))
    return logits


def partial_attention(logits: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention over one part of the keys and its log-sum-exp: fp32 ``logits``
    ``[b, Hq, t, m]`` (``-inf`` where not allowed), ``values`` ``[b, Hq or Hk, m, d]`` (GQA
    aware) -> ``(out [b, Hq, t, d] fp32, lse [b, Hq, t] fp32)``; a row with no allowed key
    gives ``out = 0`` and ``lse = -inf`` (it then weighs nothing in :func:`merge_partials`)."""
    b, hq, t, m = logits.shape
    hk = values.shape[1]
    # one exp over the logits: the row maximum, the unnormalised weights, their sum; the
    # output is normalised after the matmul ([t, d], not [t, m])
    peak = logits.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(logits.dtype).min)
    weights = torch.exp(logits - peak)
    total = weights.sum(dim=-1)
    lse = peak.squeeze(-1) + torch.log(total)  # -inf for a row with no allowed key
    # each KV head's values once, its query heads' rows stacked (GQA: no per-head copies)
    out = torch.matmul(weights.reshape(b, hk, (hq // hk) * t, m), values.float()).view(b, hq, t, -1)
    out = out / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]
    return out, lse


def merge_partials(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Exact attention over the union of disjoint key sets from their partial attentions
    ``(out, lse)`` (:func:`partial_attention`): ``sum_i exp(lse_i - LSE) out_i`` with
    ``LSE = log sum_i exp(lse_i)``. Returns fp32 ``[b, Hq, t, d]``."""
    lses = torch.stack([lse for _, lse in parts])  # [p, b, Hq, t]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total.clamp(min=torch.finfo(total.dtype).min))
    return sum(w[..., None] * out for w, (out, _) in zip(weights, parts))


def gather_entries(
    x: Tensor, starts: Tensor, run: int = 1, out: Tensor | None = None, heads: Tensor | None = None
) -> Tensor:
    """Runs of ``run`` consecutive entries of ``x`` ``[b, H, n, d]`` starting at ``starts``
    ``[b, Hs, r]`` (entry indices, ``start + run <= n``), per head ``Hs`` (a multiple of
    ``H``: query heads read their KV head's entries, GQA) -> ``[b, Hs, r * run, d]``. With
    ``heads`` ``[h]`` (int64), only those heads of ``x`` are read (``Hs`` a multiple of ``h``),
    without copying them out first.

    One ``index_select`` over rows of ``run * d`` elements that start at every entry of a
    strided view of ``x``'s memory: the output is written once, with no ``[.., d]``-expanded
    index (what ``torch.gather`` needs) and no per-head copies. A run never crosses the end
    of its head's entries, so it reads only ``x``'s own entries. ``out`` (contiguous, of the
    result's shape and dtype) receives the result instead of a new tensor."""
    b, h, n, d = x.shape
    hs, r = starts.shape[1], starts.shape[2]
    if x.stride(3) != 1 or x.stride(2) != d or x.stride(1) % d or x.stride(0) % d:
        x = x.contiguous()
    head_base = (torch.arange(b, device=x.device)[:, None] * (x.stride(0) // d)
                 + torch.arange(h, device=x.device)[None, :] * (x.stride(1) // d))  # [b, H]
    if heads is not None:
        head_base = head_base[:, heads]
    head_base = head_base.repeat_interleave(hs // head_base.shape[1], dim=1)  # [b, Hs]: each head's KV head
    last = (b - 1) * (x.stride(0) // d) + (h - 1) * (x.stride(1) // d)  # the last head's first row
    rows = x.as_strided((last + n - run + 1, run * d), (d, 1), x.storage_offset())
    index = (head_base[..., None] + starts).flatten()
    if out is None:
        return rows.index_select(0, index).view(b, hs, r * run, d)
    torch.index_select(rows, 0, index, out=out.view(b * hs * r, run * d))
    return out


__all__ = [
    "causal_allowed", "causal_mask", "chunk_mask", "decode_attention", "dense_attention", "expand_heads", "gather_entries",
    "masked_logits",
    "merge_partials", "partial_attention",
]
