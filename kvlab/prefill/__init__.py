"""Stage 2, prefill: build the cache faster with sparse attention."""

from kvlab.prefill import ashape
from kvlab.prefill.base import PrefillMethod

__all__ = ["PrefillMethod", "ashape"]
