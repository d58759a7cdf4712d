"""Stage 3b, quantize: keep smaller KV entries (the second half of the compress stage)."""

from kvlab.quantize import kivi, think
from kvlab.quantize.base import QuantizeMethod

__all__ = ["QuantizeMethod", "kivi", "think"]
