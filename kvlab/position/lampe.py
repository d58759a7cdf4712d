"""LaMPE: length-aware multi-grained positions, a mapping whose range grows with the length.

Zhang et al., "LaMPE: Length-aware Multi-grained Positional Encoding for Adaptive Long-context
Scaling Without Training", 2025, arXiv:2508.02308. For a sequence of ``L`` tokens the far
positions are compressed into ``[0, M(L)]`` with the scaled sigmoid
``M(L) = A / (1 + exp(-(a L + b)))`` (the paper's Llama-3 fit by default):
``m(p) = floor(M p / (L - 1))``. The ``head`` nearest keys keep their original positions
(fine grain); a farther key ``j`` sits at ``m(j)`` and the query at ``m(i) + b1`` with
``b1 = head - (m(head) + 1)``, so the two regions meet without a gap. Two exact passes merged
by log-sum-exp; cos and sin are scaled by ``attention_factor``; a sequence shorter than
``2 head`` is plain attention, as in the paper.

``L`` is the length attended so far, the end of the forward (the rotary of each forward
carries it, so every block of queries of one forward maps alike): a whole prefill in one
forward is the paper's prefill; each decoding step re-maps with the new length, as the
reference decoder does; a chunked prefill maps each chunk with its own end. Keys are kept
before RoPE so they can be re-mapped. Not built: the paper's third, "tail" pass.
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
    summary: ClassVar[str] = "Head window at original positions, far keys mapped into a length-aware range."

    head: int = param(512, "head window H of original positions", min=1)
    scale: float = param(6204.4, "A: the largest mapping length M(L) (Llama-3 fit)", min=1.0)
    slope: float = param(1.0493e-4, "a: the sigmoid's slope in L (Llama-3 fit)", min=0.0)
    offset: float = param(-2.4666, "b: the sigmoid's offset (Llama-3 fit)")
    attention_factor: float = param(0.1 * math.log(2) + 1, "multiplies cos and sin (the reference's scale)", min=0.0)

    def mapping_length(self, length: int) -> float:
        """``M(L) = A / (1 + exp(-(a L + b)))``."""
        return self.scale / (1 + math.exp(-(self.slope * length + self.offset)))

    def mapped(self, positions: Tensor, length: int) -> Tensor:
        """``m(p) = floor(M(L) p / (L - 1))`` (integer positions)."""
        ratio = self.mapping_length(length) / max(1, length - 1)
        return torch.floor(positions.double() * ratio).long()

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
        bias = self.head - (int(self.mapped(torch.tensor(self.head), length)) + 1)
        return [
            Pass(causal & (distance < self.head), q_pos, k_pos),
            Pass(distance >= self.head, self.mapped(q_pos, length) + bias, self.mapped(k_pos, length)),
        ]

    def context_window(self, trained: int) -> int:
        return trained * UNBOUNDED_EXTENSION
