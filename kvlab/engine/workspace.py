"""Reused scratch buffers for the tensors a decoding step builds and drops in one layer.

On a CPU, a fresh allocation of a few MiB is served by ``mmap`` and first touched page by
page: the retrieve methods' gathered keys and values (a few MiB per layer at 16k tokens) cost
more in page faults than in copying when allocated anew at every layer and step (measured in
benchmarks/README.md, "Retrieve"). A :class:`Workspace` keeps one flat buffer per name and
hands out views of it, grown when a larger one is asked for; a decoding step then allocates
nothing of the cache's size (gpt-fast's rule). Buffers are transient working memory: they
hold no KV entries and are not counted in ``kv_bytes``.

A view is valid until the next request of the same name: a method uses it within one layer's
attention and names its buffers apart (``"keys"``, ``"values"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Workspace:
    """Named, reused buffers (see the module docstring)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape`` that reuses ``name``'s memory."""
        numel = math.prod(shape)
        key = (name, dtype, torch.device(device))
        flat = self._buffers.get(key)
        if flat is None or flat.numel() < numel:
            flat = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes the buffers hold."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


__all__ = ["Workspace"]
