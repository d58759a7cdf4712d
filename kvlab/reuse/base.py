"""The reuse stage's contract: a method that attends over caches encoded apart and joined.

A reuse method (APE, :mod:`kvlab.reuse.ape`) is asked first, for every forward after a joined
cache was built (a question appended, a decoding step): it returns the attention of the
forward's queries, or None where the layer holds no joined documents (dense attention then,
as for any recipe). Which entries of a layer are the documents is stored beside the layer's
entries as a :class:`DocumentSpan` (a side index: saved with the cache, dropped with it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.registry import Method

DOCUMENTS = "documents"
"""``LayerKV.side`` key of the layer's :class:`DocumentSpan`."""


@dataclass
class DocumentSpan:
    """The entries ``start .. end`` of a layer are documents encoded apart, each after the
    same shared prefix (entries ``0 .. start``), so several share positions; entries from
    ``end`` on (a question, generated tokens) were appended after them."""

    start: int
    end: int

    def nbytes(self) -> int:
        return 0  # two integers, no tensor

    def truncate(self, num_entries: int) -> None:
        if num_entries < self.end:
            raise RuntimeError(
                f"DocumentSpan.truncate({num_entries}): the joined documents end at entry {self.end}; "
                "a joined cache is rolled back to its documents, never into them"
            )

    def on_select(self, keep: Tensor) -> None:
        raise RuntimeError("a joined documents' cache is never compressed (the recipe refuses it)")


@dataclass(frozen=True)
class ReuseMethod(Method, ABC):
    """Base of reuse methods (see the module docstring)."""

    stage: ClassVar[str] = "reuse"

    @abstractmethod
    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Attention ``[b, Hq, t, d]`` of the unrotated queries ``q`` ``[b, Hq, t, d]`` of a
        forward appended after joined documents (their keys are stored), or None where the
        layer holds no :class:`DocumentSpan`."""


__all__ = ["DOCUMENTS", "DocumentSpan", "ReuseMethod"]
