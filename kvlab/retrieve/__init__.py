"""Stage 4, retrieve: keep the cache, read only what each query needs."""

from kvlab.retrieve import (
    a2ats, lychee, quest, recycled_attention, retrieval_attention, shadowkv, tokenselect,
)
from kvlab.retrieve.base import RetrieveMethod

__all__ = [
    "RetrieveMethod", "a2ats", "lychee", "quest", "recycled_attention", "retrieval_attention",
    "shadowkv", "tokenselect",
]
