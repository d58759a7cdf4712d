"""DPE: Self-Extend with a group size per group of RoPE dimensions.

Lu et al., "Effective Length Extrapolation via Dimension-Wise Positional Embeddings
Manipulation", 2025, arXiv:2504.18857. The ``d / 2`` dimension pairs are split into
``len(scales)`` equal groups (pair 0, the fastest, in the first). Keys within ``window`` of the
query keep their original positions in every dimension; a farther key ``j`` is seen, in the
dimensions of group ``g``, at ``floor(j / s_g)`` by a query at ``floor(i / s_g) + W - floor(W / s_g)``
(Self-Extend's grouped positions with that group's scale). Two exact passes merged by
log-sum-exp; the far pass rotates each pair by its own group's positions. Default scales are
the paper's example for Llama-3-8B-Instruct; the paper finds them per model by a needle sweep,
which kvlab runs as ``kvlab calibrate dpe`` (:mod:`kvlab.position.dpe_search`, the result kept
on disk per model): ``scales=calibrated`` then reads the scales calibrated on the engine's model
with the same ``window``, and is refused, naming the command, where there are none. Scale 1 in
a group leaves it as trained; all ones is plain RoPE.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlab.engine.rotary import Rotary
from kvlab.errors import RecipeError
from kvlab.position.passes import MultiPassPosition, Pass, distances
from kvlab.registry import param, register

CALIBRATED = "calibrated"
"""``dpe(scales=calibrated)``: the scales of the model's calibration (:mod:`kvlab.position.dpe_search`)."""


@register
@dataclass(frozen=True)
class DPE(MultiPassPosition):
    name: ClassVar[str] = "dpe"
    paper: ClassVar[str] = "Lu et al., Dimension-Wise Positional Embeddings Manipulation (DPE), 2025, arXiv:2504.18857"
    summary: ClassVar[str] = "Self-Extend with its own group size per group of RoPE dimensions."

    scales: tuple[int, ...] | str = param(
        (2, 8, 2, 8, 32, 32, 32, 4),
        "group size per dimension group, fastest first (the paper's Llama-3-8B example), or "
        "calibrated: the scales kvlab calibrate dpe found on the model",
    )
    window: int = param(1024, "neighbour window W kept at original positions in every dimension", min=1)

    def __post_init__(self) -> None:
        value = self.scales
        if value != CALIBRATED and (
            not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in value)
        ):
            raise RecipeError(
                f"dpe(scales={value!r}): must be a non-empty list of integers >= 1, one group size "
                "per group of RoPE dimension pairs, e.g. [2, 8, 2, 8, 32, 32, 32, 4], or "
                f"{CALIBRATED} (the scales kvlab calibrate dpe found on the model)"
            )
        if value != CALIBRATED:
            object.__setattr__(self, "scales", tuple(value))
        super().__post_init__()

    def prepare(self, engine: Any) -> DPE | None:
        """With ``scales=calibrated``: this method with the scales calibrated on ``engine``'s
        model for this ``window`` (the engine attends with it); a :class:`RecipeError` naming
        ``kvlab calibrate dpe`` when there are none."""
        if self.scales != CALIBRATED:
            return None
        from kvlab.position.dpe_search import calibrated_scales

        return dataclasses.replace(self, scales=calibrated_scales(engine, self.window))

    def _given(self) -> tuple[int, ...]:
        if not isinstance(self.scales, tuple):
            raise RecipeError(
                f"dpe(scales={self.scales!r}): the scales are read from the model's calibration "
                "when the recipe runs on an engine (Engine.new_sequence), not before"
            )
        return self.scales

    def pair_scales(self, pairs: int) -> Tensor:
        """The group size of each of the ``pairs`` dimension pairs ``[d / 2]``."""
        scales = self._given()
        if pairs % len(scales):
            raise RecipeError(
                f"dpe(scales=[{len(scales)} numbers]): the {pairs} RoPE dimension pairs of this "
                f"model do not split into {len(scales)} equal groups; give a divisor of {pairs}"
            )
        return torch.tensor(scales).repeat_interleave(pairs // len(scales))

    def passes(self, q_pos: Tensor, k_pos: Tensor, rotary: Rotary, length: int) -> list[Pass]:
        scale = self.pair_scales(rotary.inv_freq.numel()).to(q_pos.device)
        distance = distances(q_pos, k_pos)
        far_q = q_pos[:, None] // scale + self.window - self.window // scale  # [t, d/2]
        far_k = k_pos[..., None] // scale  # [..., n, d/2]
        return [
            Pass((distance >= 0) & (distance < self.window), q_pos, k_pos),
            Pass(distance >= self.window, far_q, far_k, per_pair=True),
        ]

    def context_window(self, trained: int) -> int:
        """Up to where the most scaled group stays inside the trained range (the less scaled
        groups then see farther positions, which the paper finds those dimensions tolerate)."""
        if self.window >= trained:
            return trained
        return (trained - self.window) * max(self._given()) + self.window
