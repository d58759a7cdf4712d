"""ReRoPE and Leaky ReRoPE: relative positions capped (or slowed) past a window.

Su, "Rectified Rotary Position Embeddings" (ReRoPE, 2023, https://github.com/bojone/rerope;
kexue.fm/archives/9708). The relative position of query ``i`` and key ``j`` is ``i - j``
inside the window ``w`` and ``w`` beyond it (ReRoPE), or ``w + (i - j - w) / k`` beyond it
(Leaky ReRoPE, ``leaky=true``): the near pass uses normal positions, the far pass puts the
query at ``w`` and every key at 0 (leaky: query ``i / k + w - w / k``, key ``j / k``). Merged by
log-sum-exp. Queries are scaled by ``max(1, ln(i + 1) / ln L0)`` (``log_scale``, the reference's
log-n scaling), which is 1 inside the trained length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.rotary import Rotary
from kvlab.position.passes import (
    UNBOUNDED_EXTENSION, MultiPassPosition, Pass, distances, log_scale, trained_length,
)
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class ReRope(MultiPassPosition):
    name: ClassVar[str] = "rerope"
    paper: ClassVar[str] = "Su, Rectified Rotary Position Embeddings (ReRoPE), 2023, github.com/bojone/rerope"
    summary: ClassVar[str] = "Relative positions capped at the window (leaky: slowed by 1/k past it)."

    window: int = param(512, "window w of exact relative positions", min=1)
    leaky: bool = param(False, "Leaky ReRoPE: w + (i - j - w) / k past the window instead of w")
    k: float = param(16.0, "Leaky ReRoPE's slope divisor k (k = 1: plain RoPE)", min=1.0)
    log_scale: bool = param(True, "scale queries by max(1, ln(i + 1) / ln L0)")

    def passes(self, q_pos: Tensor, k_pos: Tensor, rotary: Rotary, length: int) -> list[Pass]:
        distance = distances(q_pos, k_pos)
        scale = log_scale(q_pos, trained_length(rotary, self.name)) if self.log_scale else None
        w = self.window
        if self.leaky:
            far_q = q_pos.double() / self.k + w - w / self.k
            far_k = k_pos.double() / self.k
        else:
            far_q = torch.full_like(q_pos, w)
            far_k = torch.zeros_like(k_pos)
        return [
            Pass((distance >= 0) & (distance < w), q_pos, k_pos, scale),
            Pass(distance >= w, far_q, far_k, scale),
        ]

    def context_window(self, trained: int) -> int:
        if self.leaky:  # the largest relative position w + (L - 1 - w) / k stays below L0
            return trained if self.window >= trained else int((trained - self.window) * self.k + self.window)
        return trained * UNBOUNDED_EXTENSION
