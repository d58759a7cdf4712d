"""Stage 2, prefill: build the cache faster with sparse attention or fewer tokens."""

from kvlab.prefill import ashape, fastkv, gemfilter
from kvlab.prefill.base import PrefillMethod

__all__ = ["PrefillMethod", "ashape", "fastkv", "gemfilter"]
