"""The machinery of position methods that give near and far keys different positions.

Self-Extend, DPE, DCA, STRING, ReRoPE and LaMPE all split the causal (query, key) pairs into
disjoint regions and rotate q and k in each region by positions of their own (keys are kept
before RoPE, :attr:`PositionMethod.stores_pre_rope`). A method only says what its regions are
(:meth:`MultiPassPosition.passes`, one :class:`Pass` per region); this module computes each
region's exact attention and merges them by log-sum-exp
(:func:`~kvlab.engine.kernels.partial_attention` / :func:`~kvlab.engine.kernels.merge_partials`),
which is one softmax over every causal key: exactly the papers' multi-pass attention. Query rows
are taken in blocks so one fp32 logit block stays bounded (never ``n x n`` at once).
"""

from __future__ import annotations

import dataclasses
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.kernels import expand_heads, masked_logits, merge_partials, partial_attention
from kvlab.engine.rotary import Rotary, apply_rotation
from kvlab.errors import RecipeError
from kvlab.position.base import PositionMethod

_MAX_LOGIT_ELEMENTS = 1 << 24  # query rows per block so one fp32 logit block stays <= 64 MiB

UNBOUNDED_EXTENSION = 32
"""Window multiplier of a method whose relative positions stay inside the trained range at any
length (DCA, ReRoPE, LaMPE): kvlab accepts prompts up to this many times the trained length
(the papers measure up to ~25x, e.g. DCA's Llama2 4k -> 100k+)."""


@dataclass(frozen=True)
class Pass:
    """One region of (query, key) pairs and the positions that rotate its q and k.

    ``region`` is boolean ``[t, n]`` (or ``[b, kv_heads, t, n]`` when keys have per-head
    positions), True for the pairs this pass covers (a subset of the causal pairs; the regions
    of one method are disjoint); ``query_positions`` ``[t]`` and ``key_positions`` (the shape of
    ``k_pos``) may be fractional; ``query_scale`` ``[t]`` multiplies the queries (ReRoPE's log
    scaling) or is None. With ``per_pair`` the positions have one more axis, one position per
    RoPE dimension pair (``[t, d/2]``, ``[..., n, d/2]``: DPE's per-group scales)."""

    region: Tensor
    query_positions: Tensor
    key_positions: Tensor
    query_scale: Tensor | None = None
    per_pair: bool = False


def rotate_pairs(rotary: Rotary, x: Tensor, positions: Tensor) -> Tensor:
    """``x`` ``[b, heads, n, d]`` rotated with a position per dimension pair, ``positions``
    ``[n, d/2]`` or ``[b, heads, n, d/2]`` (same layout and attention factor as :class:`Rotary`)."""
    freqs = positions.float() * rotary.inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    factor = rotary.attention_factor
    return apply_rotation(x, (emb.cos() * factor).to(x.dtype), (emb.sin() * factor).to(x.dtype))


def distances(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """``i - j`` for every query position ``q_pos`` ``[t]`` and key position ``k_pos`` ``[n]``
    (or ``[b, H, n]``): ``[t, n]`` (or ``[b, H, t, n]``)."""
    return q_pos[:, None] - k_pos[..., None, :]


def attended_length(q_pos: Tensor, rotary: Rotary) -> int:
    """Positions attended so far: the forward's end (``rotary.seq_len``, the same for every call
    of one forward, however a prefill or retrieve method splits its queries), else the last
    query position + 1."""
    return int(rotary.seq_len) if rotary.seq_len is not None else int(q_pos.max()) + 1


def resolve(value: int, default: int, where: str) -> int:
    """``value`` when set (> 0), else the paper's ``default``, which must be >= 1."""
    chosen = value if value > 0 else default
    if chosen < 1:
        raise RecipeError(f"{where}: resolves to {chosen} on this model; give a value >= 1")
    return chosen


def trained_length(rotary: Rotary, method: str) -> int:
    """The model's trained length carried by ``rotary`` (set by :meth:`PositionMethod.rotary`)."""
    if rotary.trained_length is None:
        raise ValueError(f"{method} needs the model's trained length: build the Rotary with trained_length")
    return int(rotary.trained_length)


@dataclass(frozen=True)
class MultiPassPosition(PositionMethod):
    """A position method made of exact attention passes over disjoint key regions."""

    own_attention: ClassVar[bool] = True

    @property
    def stores_pre_rope(self) -> bool:
        return True

    @abstractmethod
    def passes(self, q_pos: Tensor, k_pos: Tensor, rotary: Rotary, length: int) -> list[Pass]:
        """The regions of the causal pairs of queries at ``q_pos`` ``[t]`` and keys at
        ``k_pos`` ``[n]`` (or ``[b, kv_heads, n]``), with their positions; ``length`` is the
        number of positions attended so far (:func:`attended_length`: the same for every
        block of query rows of one forward)."""

    def _pass_logits(
        self, part: Pass, q: Tensor, keys: Tensor, rotary: Rotary, scaling: float, allowed: Tensor | None
    ) -> Tensor:
        scale = scaling if part.query_scale is None else scaling * part.query_scale[:, None].to(q.dtype)
        region = part.region if allowed is None else part.region & allowed
        rotate = (lambda x, pos: rotate_pairs(rotary, x, pos)) if part.per_pair else rotary.rotate
        # the softmax scale goes on the queries ([t, d]) rather than on the logits ([t, n])
        return masked_logits(rotate(q * scale, part.query_positions), rotate(keys, part.key_positions), 1.0, region)

    def logits(
        self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, rotary: Rotary, scaling: float
    ) -> Tensor:
        """Causal fp32 logits ``[b, Hq, t, n]``, each pair rotated by its region's positions."""
        out = None
        for part in self.passes(q_pos, k_pos, rotary, attended_length(q_pos, rotary)):
            logits = self._pass_logits(part, q, keys, rotary, scaling, None)
            out = logits if out is None else torch.where(expand_heads(part.region, q.shape[1]), logits, out)
        assert out is not None
        return out

    def attend(
        self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, values: Tensor,
        rotary: Rotary, scaling: float, allowed: Tensor | None = None,
    ) -> Tensor:
        """Exact attention ``[b, Hq, t, d]``: one partial attention per pass, merged by LSE.
        Each pass reads only the span of stored keys its region touches in the block of query
        rows (Self-Extend's window, DCA's current and previous chunk), not every key."""
        rows = max(1, _MAX_LOGIT_ELEMENTS // (keys.shape[-2] * q.shape[1] * max(1, q.shape[0])))
        outputs, length = [], attended_length(q_pos, rotary)
        for start in range(0, q.shape[2], rows):
            sl = slice(start, start + rows)
            block_allowed = None
            if allowed is not None:
                block_allowed = allowed[..., sl, :] if allowed.shape[-2] > 1 else allowed
            parts = []
            for part in self.passes(q_pos[sl], k_pos, rotary, length):
                touched = part.region.reshape(-1, part.region.shape[-1]).any(0).nonzero()
                if touched.numel() == 0:
                    continue  # e.g. no inter-chunk keys yet
                lo, hi = int(touched[0]), int(touched[-1]) + 1
                span = (..., slice(lo, hi))
                narrowed = dataclasses.replace(
                    part, region=part.region[span],
                    key_positions=part.key_positions[..., lo:hi, :] if part.per_pair else part.key_positions[span],
                )
                span_allowed = None if block_allowed is None else block_allowed[span]
                logits = self._pass_logits(narrowed, q[:, :, sl], keys[..., lo:hi, :], rotary, scaling, span_allowed)
                parts.append(partial_attention(logits, values[..., lo:hi, :]))
            outputs.append(merge_partials(parts).to(values.dtype))
        return torch.cat(outputs, dim=2)


def log_scale(q_pos: Tensor, trained: int) -> Tensor:
    """``max(1, ln(pos + 1) / ln L0)`` per query ``[t]`` (log-n attention scaling)."""
    return (torch.log(q_pos.double() + 1) / math.log(trained)).clamp(min=1.0).float()


__all__ = [
    "MultiPassPosition", "Pass", "UNBOUNDED_EXTENSION", "attended_length", "distances", "log_scale",
    "resolve", "rotate_pairs", "trained_length",
]


