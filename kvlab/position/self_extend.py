"""Self-Extend: grouped attention for far keys, normal attention for neighbours.

Jin et al., "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning", ICML 2024,
arXiv:2401.01325. A query at position i and a key at j with ``i - j < window`` use their normal
positions; farther keys use grouped positions: key ``j // G``, query ``i // G + W - W // G``
(the integer form of the reference code), so relative distances never exceed the trained
range when ``(L0 - W) * G + W >= L``. The two regions are disjoint and share one softmax, which
is exactly the log-sum-exp merge of the paper's two attention passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.kernels import expand_heads, masked_logits
from kvlab.engine.rotary import Rotary
from kvlab.position.base import PositionMethod
from kvlab.registry import param, register

_MAX_LOGIT_ELEMENTS = 1 << 24  # query rows per block so one fp32 logit block stays <= 64 MiB


@register
@dataclass(frozen=True)
class SelfExtend(PositionMethod):
    name: ClassVar[str] = "self_extend"
    paper: ClassVar[str] = "Jin et al., LLM Maybe LongLM (Self-Extend), ICML 2024, arXiv:2401.01325"
    summary: ClassVar[str] = "Neighbour window at normal positions, grouped positions beyond it."

    group_size: int = param(8, "group size G of far positions", min=1, max=64)
    window: int = param(1024, "neighbour window W kept at normal positions", min=1)

    @property
    def stores_pre_rope(self) -> bool:
        return True

    def context_window(self, trained: int) -> int:
        if self.window >= trained:
            return trained
        return (trained - self.window) * self.group_size + self.window

    def grouped_query_positions(self, q_pos: Tensor) -> Tensor:
        return q_pos // self.group_size + self.window - self.window // self.group_size

    def logits(
        self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, rotary: Rotary, scaling: float
    ) -> Tensor:
        near = masked_logits(rotary.rotate(q, q_pos), rotary.rotate(keys, k_pos), scaling, None)
        far = masked_logits(
            rotary.rotate(q, self.grouped_query_positions(q_pos)),
            rotary.rotate(keys, k_pos // self.group_size),
            scaling,
            None,
        )
        distance = expand_heads(q_pos[:, None] - k_pos[..., None, :], q.shape[1])
        logits = torch.where(distance < self.window, near, far)
        return logits.masked_fill(distance < 0, float("-inf"))

    def attend(
        self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, values: Tensor,
        rotary: Rotary, scaling: float, allowed: Tensor | None = None,
    ) -> Tensor:
        group = q.shape[1] // keys.shape[1]
        values = values.repeat_interleave(group, dim=1) if group > 1 else values
        rows = max(1, _MAX_LOGIT_ELEMENTS // (keys.shape[-2] * q.shape[1]))
        outputs = []
        for start in range(0, q.shape[2], rows):
            sl = slice(start, start + rows)
            logits = self.logits(q[:, :, sl], q_pos[sl], keys, k_pos, rotary, scaling)
            if allowed is not None:
                block_allowed = allowed[..., sl, :] if allowed.shape[-2] > 1 else allowed
                logits = logits.masked_fill(~expand_heads(block_allowed, q.shape[1]), float("-inf"))
            probs = torch.softmax(logits, dim=-1).to(values.dtype)
            outputs.append(torch.matmul(probs, values))
        return torch.cat(outputs, dim=2)
