"""Stage 3, compress: keep fewer or smaller KV entries."""

from kvlab.compress import (
    adakv,
    expected_attention,
    h2o,
    keydiff,
    knorm,
    pyramidkv,
    snapkv,
    streaming_llm,
    tova,
)
from kvlab.compress.base import CompressMethod, ScoredCompression

__all__ = [
    "CompressMethod",
    "ScoredCompression",
    "adakv",
    "expected_attention",
    "h2o",
    "keydiff",
    "knorm",
    "pyramidkv",
    "snapkv",
    "streaming_llm",
    "tova",
]

from kvlab.compress import cam, chelsea, kvmerger, windowkv  # noqa: E402  (merging and window methods)

__all__ += ["cam", "chelsea", "kvmerger", "windowkv"]

from kvlab.compress import duo_attention  # noqa: E402  (per-head policies: ragged layers)

__all__ += ["duo_attention"]

from kvlab.compress import infiniretri  # noqa: E402  (chunked reading: evicts between prefill chunks)

__all__ += ["infiniretri"]
