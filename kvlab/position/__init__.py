"""Stage 1, position: reach past the trained length (RoPE variants)."""

from kvlab.position import (
    dca, dpe, dprope, dynamic_ntk, lampe, llama3, longrope, ntk, pi, rerope, self_extend, string, yarn,
)
from kvlab.position.base import TRAINED_ROPE, PositionMethod

__all__ = [
    "PositionMethod", "TRAINED_ROPE", "dca", "dpe", "dprope", "dynamic_ntk", "lampe", "llama3", "longrope",
    "ntk", "pi", "rerope", "self_extend", "string", "yarn",
]
