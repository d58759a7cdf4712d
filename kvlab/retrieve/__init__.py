"""Stage 4, retrieve: keep the cache, read only what each query needs."""

from kvlab.retrieve import lychee, quest, retrieval_attention
from kvlab.retrieve.base import RetrieveMethod

__all__ = ["RetrieveMethod", "lychee", "quest", "retrieval_attention"]
