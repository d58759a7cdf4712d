"""The prefill stage: how attention is computed while the prompt is encoded, and (for
token-selective methods) which prompt tokens the model runs at all."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.registry import Method

Probe = Callable[[int], tuple[Tensor, LayerContext]]
"""``probe(layer)``: run the prompt through layers ``0..layer`` only (not the whole model);
returns that layer's unrotated queries of the last chunk ``[b, Hq, t, d]`` and its
:class:`LayerContext`, whose layer holds the whole prompt's keys."""


@dataclass(frozen=True)
class PrefillMethod(Method, ABC):
    """A prefill method. :meth:`attend` is called for prompt forwards on layers nothing was
    evicted from; by default the full KV cache is still stored.

    Token-selective methods use two more seams: :meth:`select_tokens` (the engine asks it,
    before a context prefill, which tokens to prefill), and ``ctx.propagate_only(rows)`` from
    :meth:`attend` (later layers run only those rows of the forward)."""

    stage: ClassVar[str] = "prefill"
    whole_context: ClassVar[bool] = False
    """True when the context must be prefilled in one forward (the method changes what later
    layers see of the whole context, so it cannot act chunk by chunk)."""
    selects_tokens: ClassVar[bool] = False
    """True when the cache ends up holding only some of the context's tokens (the method
    chooses which tokens the model, or its later layers, run)."""
    selects_kv: ClassVar[bool] = False
    """True when the method chooses the kept KV entries itself (no compress method then)."""
    plain_rope_kernel: ClassVar[bool] = False
    """True when the method attends with its own kernel over keys rotated by plain RoPE at
    their positions, so it cannot serve a position method with its own attention
    (:attr:`PositionMethod.own_attention`); the recipe refuses that combination."""

    @abstractmethod
    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Attention ``[b, Hq, t, d]`` of the forward's unrotated queries, or None for dense."""

    def select_tokens(self, ids: list[int], probe: Probe, num_layers: int) -> list[int]:
        """The tokens of the context ``ids`` the model prefills (by default all of them); the
        cache then holds only these, at fresh positions ``0..len-1``. ``probe`` runs the
        context through the first layers of the model (of ``num_layers``)."""
        return ids


def layer_at(fraction: float, num_layers: int) -> int:
    """The layer at ``fraction`` of the depth, ``floor(fraction * num_layers)`` (at most the
    last): papers name a layer of a 32-layer model, e.g. 15/32 -> layer 15 of 32, 13 of 28."""
    return min(num_layers - 1, int(fraction * num_layers))
