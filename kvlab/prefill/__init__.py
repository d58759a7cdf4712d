"""Stage 2, prefill: build the cache faster with sparse attention or fewer tokens."""

from kvlab.prefill import (
    ashape, block_sparse, fastkv, gemfilter, sale, tri_shape, vertical_slash,
)
from kvlab.prefill.base import PrefillMethod

__all__ = [
    "PrefillMethod", "ashape", "block_sparse", "fastkv", "gemfilter", "sale", "tri_shape",
    "vertical_slash",
]
