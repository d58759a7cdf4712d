"""Stage 3, compress: keep fewer or smaller KV entries."""

from kvlab.compress import snapkv, streaming_llm
from kvlab.compress.base import CompressMethod, ScoredCompression

__all__ = ["CompressMethod", "ScoredCompression", "snapkv", "streaming_llm"]
