"""Brute-force references for the position methods with their own attention.

A method of this kind is defined by its relative-position matrix ``R[i, j]`` (the position
of key ``j`` as seen from query ``i``). RoPE makes the logit of a pair depend on ``R`` only:
``<rot(q_i, p), rot(k_j, p')> = <rot(q_i, p - p'), k_j>``, so the references here rotate each
query by ``R[i, j]`` for every key ``j``, pair by pair, and take one causal softmax per query:
nothing of kvlab's passes, regions or log-sum-exp merge is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from kvlab.engine.rotary import Rotary

Relative = Callable[[int, int], float]
"""``relative(i, j)``: the relative position of key position ``j`` seen from query position ``i``."""


def rotate_by(x: Tensor, position: float, inv_freq: Tensor, factor: float = 1.0) -> Tensor:
    """``x`` ``[..., d]`` rotated by one (possibly fractional) position, HF layout (channel
    ``i`` paired with ``i + d/2``), cos and sin times ``factor``."""
    angles = position * inv_freq.double()
    cos = torch.cat([angles.cos(), angles.cos()]).float() * factor
    sin = torch.cat([angles.sin(), angles.sin()]).float() * factor
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


def pairwise_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: list[int], k_pos: Tensor, relative: Relative,
    rotary: Rotary, scaling: float, query_scale: Callable[[int], float] | None = None,
) -> Tensor:
    """Attention ``[1, Hq, t, d]`` of unrotated ``q`` ``[1, Hq, t, d]`` at ``q_pos`` over
    unrotated keys ``k`` ``[1, Hk, n, d]`` at ``k_pos`` ``[n]`` or ``[1, Hk, n]`` (per-head
    positions, e.g. after compression), pair by pair."""
    _, hq, t, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    factor = rotary.attention_factor
    out = torch.zeros(1, hq, t, d)
    for h in range(hq):
        kh = h // (hq // hk)
        positions = (k_pos if k_pos.dim() == 1 else k_pos[0, kh]).tolist()
        for r, i in enumerate(q_pos):
            scale = query_scale(i) if query_scale else 1.0
            logits = []
            for j in range(n):
                if positions[j] > i:
                    logits.append(-math.inf)
                    continue
                qr = rotate_by(q[0, h, r] * scale, relative(i, positions[j]), rotary.inv_freq, factor)
                kr = k[0, kh, j] * factor  # rotated by position 0
                logits.append(float((qr * kr).sum()) * scaling)
            probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0).float()
            out[0, h, r] = (probs[:, None] * v[0, kh]).sum(0)
    return out


def relative_attention(
    relative: Relative, attention_factor: float = 1.0, query_scale: Callable[[int], float] | None = None,
):
    """The attention of ``tests.compress.reference.reference_logits`` for a method given by
    ``relative(i, j)`` (token ``i`` is at position ``i``): every causal pair rotated by its
    relative position, one softmax per query."""

    def attention(layer, q, k, v, rope):
        inv_freq = rope.model.model.rotary_emb.inv_freq
        hq, n, d = q.shape
        g = hq // k.shape[0]
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        out = torch.zeros_like(q)
        for i in range(n):
            scale = query_scale(i) if query_scale else 1.0
            rel = torch.tensor([relative(i, j) for j in range(i + 1)], dtype=torch.float64)
            angles = rel[:, None] * inv_freq.double()[None, :]  # [i + 1, d / 2]
            cos = torch.cat([angles.cos(), angles.cos()], -1).float() * attention_factor
            sin = torch.cat([angles.sin(), angles.sin()], -1).float() * attention_factor
            qi = q[:, i : i + 1] * scale  # [Hq, 1, d]
            qr = qi * cos + torch.cat([-qi[..., d // 2 :], qi[..., : d // 2]], -1) * sin  # [Hq, i + 1, d]
            logits = (qr * k[:, : i + 1] * attention_factor).sum(-1) / d**0.5
            out[:, i] = (torch.softmax(logits, dim=-1)[..., None] * v[:, : i + 1]).sum(1)
        return out

    return attention


def engine_against_reference(
    recipe: str, relative: Relative, attention_factor: float = 1.0,
    query_scale: Callable[[int], float] | None = None, prompt: int = 60, steps: int = 4,
    chunk: int = 32, seed: int = 2, **overrides,
) -> tuple[Tensor, Tensor, Tensor]:
    """kvlab's log-probabilities for ``recipe`` (a prefill of ``prompt`` tokens in chunks of
    ``chunk``, then ``steps`` teacher-forced decoding steps), the written-out reference's and
    dense attention's, each ``[steps + 1, vocab]``."""
    from tests.compress.reference import reference_logits
    from tests.conftest import prompt_ids, tiny_engine

    ids = prompt_ids(prompt + steps, seed=seed)
    attention = relative_attention(relative, attention_factor, query_scale)
    expected = torch.log_softmax(reference_logits(ids, attention, **overrides), -1)[prompt - 1 :]
    dense = torch.log_softmax(reference_logits(ids, **overrides), -1)[prompt - 1 :]
    engine = tiny_engine(**overrides)
    engine.prefill_chunk = chunk
    cache = engine.new_sequence(recipe)
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    got = engine.teacher_force(cache, logits, ids[prompt:] + [0])
    return got, expected, dense
