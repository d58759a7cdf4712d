"""LaMPE: length-aware multi-grained positions, a mapping whose range grows with the length.

Zhang et al., "LaMPE: Length-aware Multi-grained Positional Encoding for Adaptive Long-context
Scaling Without Training", 2025, arXiv:2508.02308 (reference code: github.com/scar-on/LaMPE,
``llama_cache1.py``). For a sequence of ``L`` tokens the far positions are compressed into
``[0, M(L)]`` with the scaled sigmoid ``M(L) = A / (1 + exp(-(a L + b)))`` (the paper's
Llama-3 fit by default; ``M = 1536`` below 8192 tokens, the reference's ``remap_uselen``):
``m(p) = floor(M p / (L - 1))``. Three regions of (query ``i``, key
``j``) pairs, three exact passes merged by log-sum-exp (:mod:`kvlab.position.passes`):

- **head** (fine grain): the ``head`` nearest keys, ``i - j < H``, at their original positions;
- **tail** (fine grain): the first ``T'`` keys seen by the last ``T'`` queries,
  ``j <= i - (L - T')``: the query at ``i - b2``, the key at ``j``. ``T'`` is ``tail``
  stretched to the end of its mapped chunk (the last index ``p`` with ``m(p) = m(tail)``) and
  ``b2 = (L - 1 - T') - m(L - 1 - T') - b1``, so the start of the sequence keeps full resolution
  for the end of the prompt at the distance the mapping gives it;
- **middle** (coarse grain): every other pair, the key at ``m(j)`` and the query at
  ``m(i) + b1`` with ``b1 = H - (m(H) + 1)``, so it meets the head region without a gap.

cos and sin are scaled by ``attention_factor``; a sequence shorter than ``2 H`` is plain
attention, as in the paper; ``tail=0`` leaves out the tail pass (the two-pass variant of the
reference's ``llama_sw_map.py``). The regions are disjoint (the reference's flash-attention
windows are inclusive at both ends, so its prefill counts the key at distance ``H`` in the head
and middle passes both, and the key at ``j = i - L + T'`` in the middle and tail passes both;
kvlab gives each pair to one pass, as the reference's decoding does).

``L`` is the length attended so far, the end of the forward (the rotary of each forward
carries it, so every block of queries of one forward maps alike): a whole prefill in one
forward is the paper's prefill. A chunked prefill maps each chunk with its own end, and each
decoding step re-maps with the new length (the three regions computed as for a prefill of
``L`` tokens, seen from the new query); the reference's decoder instead keeps the prefill's
mapping, ``b1``, ``b2`` and ``T'``. Keys are kept before RoPE so they can be re-mapped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlab.engine.rotary import Rotary
from kvlab.position.passes import UNBOUNDED_EXTENSION, MultiPassPosition, Pass, distances
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class LaMPE(MultiPassPosition):
    name: ClassVar[str] = "lampe"
    paper: ClassVar[str] = "Zhang et al., LaMPE: Length-aware Multi-grained Positional Encoding, 2025, arXiv:2508.02308"
    summary: ClassVar[str] = (
        "Head window and the first tail keys at original positions, the rest mapped into a "
        "length-aware range (three passes)."
    )

    head: int = param(512, "head window H of original positions", min=1)
    tail: int = param(200, "T: the first keys the last queries see at full resolution (0: no tail pass)", min=0)
    scale: float = param(6204.4, "A: the largest mapping length M(L) (Llama-3 fit)", min=1.0)
    slope: float = param(1.0493e-4, "a: the sigmoid's slope in L (Llama-3 fit)", min=0.0)
    offset: float = param(-2.4666, "b: the sigmoid's offset (Llama-3 fit)")
    attention_factor: float = param(0.1 * math.log(2) + 1, "multiplies cos and sin (the reference's scale)", min=0.0)
    short: int = param(8192, "below this many tokens M(L) is short_mapping, not the sigmoid (0: always the sigmoid)", min=0)
    short_mapping: float = param(1536.0, "M(L) below short tokens (the reference's 1536)", min=1.0)

    def mapping_length(self, length: int) -> float:
        """``M(L) = A / (1 + exp(-(a L + b)))``; ``short_mapping`` when ``L < short``."""
        if length < self.short:
            return self.short_mapping
        return self.scale / (1 + math.exp(-(self.slope * length + self.offset)))

    def mapped(self, positions: Tensor, length: int) -> Tensor:
        """``m(p) = floor(M(L) p / (L - 1))`` (integer positions)."""
        ratio = self.mapping_length(length) / max(1, length - 1)
        return torch.floor(positions.double() * ratio).long()

    def tail_keys(self, length: int) -> int:
        """``T'``: ``tail`` stretched to the last position of its mapped chunk (the
        reference's ``find_chunk_last_index``); keys ``j < T'`` form the tail region of the
        last query."""
        start = min(self.tail, length - 1)
        mapped = self.mapped(torch.arange(length), length)
        return int(torch.searchsorted(mapped, mapped[start], right=True)) - 1

    def frequency_key(self, seq_len: int, trained: int) -> int | None:
        return seq_len  # a new rotary (its seq_len: the mapping's L) for every forward

    def rotary(self, config: Any, seq_len: int) -> Rotary:
        base = super().rotary(config, seq_len)
        return Rotary(base.inv_freq, base.attention_factor * self.attention_factor, base.trained_length, seq_len)

    def passes(self, q_pos: Tensor, k_pos: Tensor, rotary: Rotary, length: int) -> list[Pass]:
        distance = distances(q_pos, k_pos)
        causal = distance >= 0
        if length < 2 * self.head:
            return [Pass(causal, q_pos, k_pos)]
        at = lambda p: int(self.mapped(torch.tensor(p), length))  # noqa: E731
        b1 = self.head - (at(self.head) + 1)
        far = distance >= self.head
        middle = Pass(far, self.mapped(q_pos, length) + b1, self.mapped(k_pos, length))
        head = Pass(causal & (distance < self.head), q_pos, k_pos)
        if self.tail == 0:
            return [head, middle]
        kept = self.tail_keys(length)
        b2 = (length - 1 - kept) - at(length - 1 - kept) - b1
        in_tail = far & (k_pos[..., None, :] <= (q_pos - (length - kept))[:, None])
        return [
            head,
            Pass(in_tail, q_pos - b2, k_pos),
            Pass(far & ~in_tail, middle.query_positions, middle.key_positions),
        ]

    def context_window(self, trained: int) -> int:
        return trained * UNBOUNDED_EXTENSION
