"""Stage 1, position: reach past the trained length (RoPE variants)."""

from kvlab.position import dynamic_ntk, self_extend, yarn
from kvlab.position.base import TRAINED_ROPE, PositionMethod

__all__ = ["PositionMethod", "TRAINED_ROPE", "dynamic_ntk", "self_extend", "yarn"]
