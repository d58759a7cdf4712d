"""The quantize half of the compress stage: smaller KV entries, in a storage format of its own.

A quantize method supplies the layer storage (:meth:`QuantizeMethod.new_layer`, a
:class:`~kvlab.engine.cache.LayerKV` subclass). Eviction (the ``compress`` stage) runs first, at
the end of the context prefill, on full-precision entries; then the layer's ``end_prefill``
converts what is kept. ``kv_bytes`` counts the packed tensors the layer really holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.engine.cache import LayerKV
from kvlab.registry import Method


@dataclass(frozen=True)
class QuantizeMethod(Method, ABC):
    stage: ClassVar[str] = "quantize"
    needs_rotated_keys: ClassVar[bool] = False
    """True when the stored format is defined on post-RoPE keys (ThinK's channel choice):
    position methods that keep keys before RoPE are then refused (``check_compatible``)."""

    @abstractmethod
    def new_layer(self) -> LayerKV:
        """A fresh, empty layer storage in this method's format."""

    def convert(self, q: Tensor, ctx: LayerContext) -> None:
        """Called in every layer at the end of the context prefill, after eviction, with the
        forward's last queries ``q`` ``[b, Hq, t, d]`` (unrotated): convert the kept entries to
        this method's format. By default the layer's own :meth:`LayerKV.end_prefill` does it
        (KIVI); a method whose conversion depends on the queries (ThinK) overrides this."""
        ctx.layer.end_prefill()
