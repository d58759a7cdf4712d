"""Stage 1, position: reach past the trained length (RoPE variants)."""

from kvlab.position import dprope, dynamic_ntk, llama3, longrope, ntk, pi, self_extend, yarn
from kvlab.position.base import TRAINED_ROPE, PositionMethod

__all__ = [
    "PositionMethod", "TRAINED_ROPE", "dprope", "dynamic_ntk", "llama3", "longrope", "ntk", "pi",
    "self_extend", "yarn",
]
