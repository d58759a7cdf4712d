"""The one per-forward object: :class:`ForwardContext`.

The engine builds one for every model forward and hands it to the model as the ``kvlab``
keyword argument, which transformers passes through to every attention call. It carries the
recipe, the new tokens' positions, the RoPE frequencies, the :class:`Phase`, what the methods
prepared, and a scratch space shared by the layers of this forward. The cache holds storage
only; the engine holds nothing of one forward.

Two seams let a prefill method change what the layers of a forward see (token-selective
prefill): ``stop_after`` ends the forward inside that layer's attention with
:class:`StopForward` (a probe through the first layers, GemFilter), and a layer that asks for
it (:meth:`LayerContext.propagate_only`) makes the engine run only those tokens through the
later layers (FastKV). ``counts`` tallies the tokens each layer ran (``Stats.prefilled_per_layer``),
``pairs`` the query-key pairs its attention computed (``Stats.attended_pairs_per_layer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from kvlab.engine.cache import LayerKV
from kvlab.engine.context import LayerContext, Phase
from kvlab.engine.rotary import Rotary
from kvlab.engine.sequence import KVCache
from kvlab.position.base import TRAINED_ROPE, PositionMethod
from kvlab.recipe import Recipe


@dataclass
class ForwardContext:
    """What one model forward does (see the module docstring). ``positions`` ``[t]``."""

    recipe: Recipe
    cache: KVCache
    positions: Tensor
    rotary: Rotary
    phase: Phase
    prepared: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    stop_after: int | None = None
    """Stop the forward in this layer's attention, once its keys are stored (a probe)."""
    counts: list[int] | None = None
    """Tokens each layer ran in this prefill, added to as layers store (None: not counted)."""
    pairs: list[int] | None = None
    """Query-key pairs (summed over query heads) each layer's prefill attention computed,
    added to by :meth:`LayerContext.count_pairs` (None: not counted)."""
    local_rotary: Rotary | None = None
    """RoPE of the sliding-window (local) layers, as the model was trained (Gemma-3's
    ``rope_local_base_freq``): the position method acts on the global layers only."""

    def __post_init__(self) -> None:
        if type(self.rotary).cos_sin is Rotary.cos_sin:  # a method's own cos_sin is kept as is
            self.rotary = self.rotary.pinned(self.positions)
        if self.local_rotary is not None:
            self.local_rotary = self.local_rotary.pinned(self.positions)

    @property
    def position(self) -> PositionMethod:
        """The recipe's position method as it runs on this model (what its
        :meth:`PositionMethod.prepare` gave, e.g. DPE's calibrated scales), RoPE as trained
        when the recipe has none."""
        return self.prepared.get("position") or self.recipe.position or TRAINED_ROPE

    def layer_rope(self, layer: LayerKV) -> tuple[PositionMethod, Rotary]:
        """The position method and rotary of ``layer``: the recipe's for a global layer, RoPE
        as trained with the local frequencies for a sliding-window layer (whose window the
        model was trained on: no position method has anything to extend there)."""
        if layer.window is None:
            return self.position, self.rotary
        if self.local_rotary is None:
            raise RuntimeError("a sliding-window layer was reached without the local layers' rotary")
        return TRAINED_ROPE, self.local_rotary

    def store(self, index: int, keys: Tensor, values: Tensor) -> LayerKV:
        """Append the forward's new (unrotated) keys and values ``[b, kv_heads, t, d]`` to layer
        ``index``: keys rotated at their positions, unless the position method keeps them
        before RoPE."""
        layer = self.cache.layers[index]
        position, rotary = self.layer_rope(layer)
        if not position.stores_pre_rope:
            keys = rotary.rotate(keys, self.positions)
        layer.append(keys, values, self.positions)
        if self.counts is not None and self.phase.is_prefill:
            self.counts[index] += keys.shape[2]
        return layer

    def layer_context(self, index: int, scaling: float) -> LayerContext:
        """The view of this forward from layer ``index``, as the stage methods see it."""
        layer = self.cache.layers[index]
        position, rotary = self.layer_rope(layer)
        return LayerContext(
            index=index, num_layers=len(self.cache.layers), layer=layer,
            positions=self.positions, rotary=rotary, position=position,
            scaling=scaling, phase=self.phase, prepared=self.prepared, scratch=self.scratch,
            workspace=self.cache.workspace,
            pairs=self.pairs if self.phase.is_prefill else None,
        )


@dataclass
class BatchForward:
    """One model forward that runs one decoding step of several sequences together (a server
    answering concurrent requests): row ``i`` of the batch is ``forwards[i]``'s token. The
    layers outside attention (projections, MLP, norms, the LM head) compute every row in one
    batched matmul; the attention entry point gives each row its own :class:`ForwardContext`,
    so each sequence attends over its own cache with its own recipe, as it would alone."""

    forwards: list[ForwardContext]

    def __post_init__(self) -> None:
        if not self.forwards or any(f.phase is not Phase.DECODE or f.positions.numel() != 1 for f in self.forwards):
            raise ValueError("a BatchForward holds one decoding step (one token) of each of one or more sequences")


class StopForward(Exception):
    """Raised in the attention of layer ``ForwardContext.stop_after``: carries that layer's
    unrotated queries ``[b, Hq, t, d]`` and its :class:`LayerContext` (keys stored)."""

    def __init__(self, query: Tensor, ctx: LayerContext) -> None:
        super().__init__(f"forward stopped after storing layer {ctx.index}")
        self.query = query
        self.ctx = ctx


__all__ = ["BatchForward", "ForwardContext", "Phase", "StopForward"]
