"""Self-Extend: grouped attention for far keys, normal attention for neighbours.

Jin et al., "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning", ICML 2024,
arXiv:2401.01325. A query at position i and a key at j with ``i - j < window`` use their normal
positions; farther keys use grouped positions: key ``j // G``, query ``i // G + W - W // G``
(the integer form of the reference code), so relative distances never exceed the trained
range when ``(L0 - W) * G + W >= L``. The two regions are disjoint passes merged by
log-sum-exp (:mod:`kvlab.position.passes`), exactly the paper's two attention passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.engine.rotary import Rotary
from kvlab.position.passes import MultiPassPosition, Pass, distances
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class SelfExtend(MultiPassPosition):
    name: ClassVar[str] = "self_extend"
    paper: ClassVar[str] = "Jin et al., LLM Maybe LongLM (Self-Extend), ICML 2024, arXiv:2401.01325"
    summary: ClassVar[str] = "Neighbour window at normal positions, grouped positions beyond it."

    group_size: int = param(8, "group size G of far positions", min=1, max=64)
    window: int = param(1024, "neighbour window W kept at normal positions", min=1)

    def context_window(self, trained: int) -> int:
        if self.window >= trained:
            return trained
        return (trained - self.window) * self.group_size + self.window

    def grouped_query_positions(self, q_pos: Tensor) -> Tensor:
        return q_pos // self.group_size + self.window - self.window // self.group_size

    def passes(self, q_pos: Tensor, k_pos: Tensor, rotary: Rotary, length: int) -> list[Pass]:
        distance = distances(q_pos, k_pos)
        return [
            Pass((distance >= 0) & (distance < self.window), q_pos, k_pos),
            Pass(distance >= self.window, self.grouped_query_positions(q_pos), k_pos // self.group_size),
        ]
