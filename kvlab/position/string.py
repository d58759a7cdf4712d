"""STRING: shifted relative positions, so the well-trained small distances serve far keys too.

An et al., "Why Does the Effective Context Length of LLMs Fall Short?", ICLR 2025,
arXiv:2410.18745. The relative position of query ``i`` and key ``j`` is ``i - j`` when
``i - j < shift`` and ``i - j - shift + local_window`` beyond, which drops the rarely trained
largest positions and reuses frequent ones: pass 1 is RoPE over the ``shift`` nearest keys;
pass 2 puts the query at ``i - shift + local_window`` against keys at their own positions.
Merged by log-sum-exp; cos and sin are scaled by ``attention_factor``. It acts inside the
trained length (its gain is effective length) and keeps every position below ``L0`` up to
``L0 + shift - local_window`` tokens. Defaults: ``shift = floor(0.33 L0)``, ``local_window``
128, attention factor ``0.1 ln 2 + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from kvlab.engine.rotary import Rotary
from kvlab.errors import RecipeError
from kvlab.position.passes import MultiPassPosition, Pass, distances, resolve, trained_length
from kvlab.registry import param, register


@register
@dataclass(frozen=True)
class String(MultiPassPosition):
    name: ClassVar[str] = "string"
    paper: ClassVar[str] = "An et al., Why Does the Effective Context Length of LLMs Fall Short? (STRING), ICLR 2025, arXiv:2410.18745"
    summary: ClassVar[str] = "Relative positions past the shift S reuse small ones (i - j - S + W)."

    shift: int = param(0, "shift S: distances >= S move down by S - W (0: floor(0.33 x trained length))", min=0)
    local_window: int = param(128, "local window W: the shifted distances start at W", min=0)
    attention_factor: float = param(0.1 * math.log(2) + 1, "multiplies cos and sin (the reference's scale)", min=0.0)

    def resolved_shift(self, trained: int) -> int:
        shift = resolve(self.shift, int(0.33 * trained), f"string(shift={self.shift})")
        if self.local_window > shift:
            raise RecipeError(
                f"string(shift={shift}, local_window={self.local_window}): need local_window <= shift"
            )
        return shift

    def rotary(self, config: Any, seq_len: int) -> Rotary:
        base = super().rotary(config, seq_len)
        return Rotary(base.inv_freq, base.attention_factor * self.attention_factor, base.trained_length)

    def passes(self, q_pos: Tensor, k_pos: Tensor, rotary: Rotary, length: int) -> list[Pass]:
        shift = self.resolved_shift(trained_length(rotary, self.name))
        distance = distances(q_pos, k_pos)
        return [
            Pass((distance >= 0) & (distance < shift), q_pos, k_pos),
            Pass(distance >= shift, q_pos - shift + self.local_window, k_pos),
        ]

    def context_window(self, trained: int) -> int:
        return trained + self.resolved_shift(trained) - self.local_window
