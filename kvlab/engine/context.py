"""What a method sees of one forward, in one layer: :class:`LayerContext` and the :class:`Phase`.

The engine builds one :class:`~kvlab.engine.forward.ForwardContext` per model forward (the
recipe, the new tokens' positions, the rotary frequencies, the phase, what the methods
prepared); each attention layer hands the stage methods a :class:`LayerContext`, the view of
that forward from one layer. Nothing per-forward is stored on the cache or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from kvlab.engine.cache import LayerKV
from kvlab.engine.kernels import causal_allowed
from kvlab.engine.rotary import Rotary
from kvlab.engine.workspace import Workspace
from kvlab.position.base import PositionMethod


class Phase(Enum):
    """What a forward is doing, in the KV cache's life.

    - ``CONTEXT``: a chunk of a context prefill that ends in compression (the compress method
      observes it);
    - ``CONTEXT_END``: the last chunk of that prefill: observed, then the layer is compressed
      and converted to the quantize method's format;
    - ``APPEND``: prompt tokens appended to an already built cache (a question in a session),
      never compressed;
    - ``DECODE``: one generated (or teacher-forced) token.
    """

    CONTEXT = "context"
    CONTEXT_END = "context-end"
    APPEND = "append"
    DECODE = "decode"

    @property
    def is_prefill(self) -> bool:
        """Prompt tokens (where a sparse prefill method applies), not a decoding step."""
        return self is not Phase.DECODE

    @property
    def observed(self) -> bool:
        """A chunk of the context the compress method observes."""
        return self in (Phase.CONTEXT, Phase.CONTEXT_END)

    @property
    def ends_context(self) -> bool:
        """The end of the context prefill: compress and convert now."""
        return self is Phase.CONTEXT_END


PROPAGATED_ROWS = "propagated_rows"
"""``scratch`` key of the rows :meth:`LayerContext.propagate_only` keeps for later layers."""


@dataclass
class LayerContext:
    """Everything a method needs to act on one layer during one forward.

    ``positions`` ``[t]`` are the positions of the forward's new tokens; ``rotary`` the RoPE
    frequencies the position method chose for this length; ``prepared`` what each stage's
    method computed once per model (:meth:`Method.prepare`), by stage; ``scratch`` is shared
    by the layers of this forward and dropped with it (a method that decides in one layer for
    the next keeps its choice there, e.g. WindowKV's groups); ``workspace`` holds the
    sequence's reused buffers for tensors built and dropped within one layer's attention.
    """

    index: int
    num_layers: int
    layer: LayerKV
    positions: Tensor
    rotary: Rotary
    position: PositionMethod
    scaling: float
    phase: Phase = Phase.DECODE
    prepared: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    workspace: Workspace = field(default_factory=Workspace)
    pairs: list[int] | None = None
    """The forward's per-layer tally of computed query-key pairs (prefill only; None: off)."""

    def count_pairs(self, pairs: int | Tensor) -> None:
        """Add ``pairs`` query-key pairs (summed over query heads) to what this layer's
        attention computed in this prefill (``Stats.attended_pairs_per_layer``)."""
        if self.pairs is not None:
            self.pairs[self.index] += int(pairs)

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A reused uninitialised buffer of ``shape`` with ``like``'s dtype and device."""
        return self.workspace.buffer(name, shape, like.dtype, like.device)

    def propagate_only(self, rows: Tensor) -> None:
        """Run only the forward's tokens at ``rows`` ``[k]`` (sorted indices into this forward's
        tokens) through the layers after this one: the engine slices the hidden states and
        positions at the next decoder layer (token-selective propagation, FastKV)."""
        self.scratch[PROPAGATED_ROWS] = rows

    def attend(
        self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, values: Tensor,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """Exact attention of unrotated queries ``q`` ``[b, Hq, t, d]`` at ``q_pos`` over stored
        keys at ``k_pos``, causal by position, restricted further by ``allowed``. In a prefill
        the pairs it computes are counted (:meth:`count_pairs`)."""
        if self.pairs is not None:
            self.count_pairs(causal_pairs(q, q_pos, k_pos, allowed))
        return self.position.attend(q, q_pos, keys, k_pos, values, self.rotary, self.scaling, allowed)

    def logits(self, q: Tensor, q_pos: Tensor) -> Tensor:
        """fp32 causal logits ``[b, Hq, t, n]`` of unrotated queries over the whole layer."""
        layer = self.layer
        return self.position.logits(q, q_pos, layer.keys, layer.key_positions(), self.rotary, self.scaling)


def causal_pairs(q: Tensor, q_pos: Tensor, k_pos: Tensor, allowed: Tensor | None) -> Tensor:
    """Query-key pairs, summed over ``q``'s batch and heads, of causal attention of queries at
    ``q_pos`` ``[t]`` over keys at ``k_pos`` ``[n]`` or ``[b, Hk, n]`` (stored in position
    order), restricted by the boolean ``allowed`` where given."""
    b, hq = q.shape[:2]
    if allowed is not None and allowed.dtype == torch.bool:
        mask = causal_allowed(q_pos, k_pos) & allowed
    elif k_pos.dim() == 1:
        return torch.searchsorted(k_pos, q_pos, right=True).sum() * (b * hq)
    else:
        mask = None
        seen = torch.searchsorted(k_pos.contiguous(), q_pos.expand(*k_pos.shape[:2], -1).contiguous(), right=True)
        return seen.sum() * (hq // k_pos.shape[1])
    while mask.dim() < 4:
        mask = mask[None]
    return mask.sum() * (b // mask.shape[0]) * (hq // mask.shape[1])


__all__ = ["PROPAGATED_ROWS", "LayerContext", "Phase", "causal_pairs"]
