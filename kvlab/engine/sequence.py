"""One sequence served with one recipe: :class:`Sequence`, and the ``Cache`` the model sees.

A :class:`Sequence` is what a request (``Engine.generate``) or a session keeps between
forwards: the recipe, what its methods prepared once per model, the RoPE frequencies memoised
for the current length, and the KV storage (:class:`KVCache`, a list of
:class:`~kvlab.engine.cache.LayerKV`). Per-forward state lives in
:class:`~kvlab.engine.forward.ForwardContext`, never here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache

from kvlab.engine.cache import CacheMark, LayerKV, SlidingLayerKV
from kvlab.engine.rotary import Rotary
from kvlab.engine.workspace import Workspace
from kvlab.position.base import TRAINED_ROPE, PositionMethod
from kvlab.recipe import Recipe


class KVCache(Cache):
    """The transformers ``Cache`` kvlab hands the model: storage only, one :class:`LayerKV` per
    layer. New keys and values are stored by kvlab's attention function (which knows the
    forward's positions and rotary), so :meth:`update` passes them through untouched.

    ``windows`` gives each layer's sliding window (None: a global layer, made by
    ``new_layer``, the recipe's storage format); a sliding-window layer is a
    :class:`SlidingLayerKV`, which keeps its window only, in plain storage."""

    def __init__(
        self, num_layers: int, new_layer: Callable[[], LayerKV] = LayerKV,
        windows: list[int | None] | None = None,
    ) -> None:
        windows = windows or [None] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"KVCache: {len(windows)} windows for {num_layers} layers")
        super().__init__(layers=[new_layer() if w is None else SlidingLayerKV(w) for w in windows])
        self.layers: list[LayerKV]
        self.workspace = Workspace()
        """Reused buffers of the decoding steps on this cache (not KV: not in :meth:`nbytes`)."""

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds, all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def offloaded_nbytes(self) -> int:
        """Bytes held on the offloaded tier, all layers (not in :meth:`nbytes`)."""
        return sum(layer.offloaded_nbytes() for layer in self.layers)

    def mean_entries(self) -> float:
        """Entries held per layer and KV head, averaged over layers."""
        per_layer = [layer.head_entries() for layer in self.layers]
        return sum(sum(h) / len(h) for h in per_layer if h) / max(1, len(self.layers))

    def mark(self, snapshot: bool = False) -> CacheMark:
        """Where the cache stands now; with ``snapshot``, each layer also keeps its tensors (by
        reference: memory is held only for what a later eviction replaces), so that a rollback
        restores entries evicted in between too."""
        return CacheMark(tuple(layer.mark(snapshot) for layer in self.layers))

    def fork(self) -> KVCache:
        """The same entries for another sequence (:meth:`LayerKV.fork`: tensors shared until
        either appends), with a workspace of its own."""
        twin = KVCache(0)
        twin.layers = [layer.fork() for layer in self.layers]
        return twin

    def rollback(self, mark: CacheMark) -> None:
        """Back to ``mark``: discard every entry appended since, bring back entries evicted since."""
        for layer, layer_mark in zip(self.layers, mark.layers):
            layer.restore(layer_mark)


class Sequence:
    """A recipe's state for one token sequence (see the module docstring).

    ``prepared`` holds, by stage, what :meth:`Method.prepare` computed; ``cache`` the entries.
    """

    def __init__(self, recipe: Recipe, cache: KVCache, prepared: dict[str, Any]) -> None:
        self.recipe = recipe
        self.cache = cache
        self.prepared = prepared
        self.layer_tokens: list[int] = [0] * len(cache.layers)
        """Tokens each layer ran in the last prefill (fewer in later layers when a prefill
        method selects tokens)."""
        self.layer_pairs: list[int] = [0] * len(cache.layers)
        """Query-key pairs each layer's attention computed in the last prefill, summed over
        query heads (fewer than the causal ``n (n + 1) / 2`` per head under a sparse pattern)."""
        self._rotary: tuple[Any, Rotary] | None = None

    @property
    def position(self) -> PositionMethod:
        """The recipe's position method as it runs on this model (what its
        :meth:`PositionMethod.prepare` gave, if anything), RoPE as trained when it has none."""
        return self.prepared.get("position") or self.recipe.position or TRAINED_ROPE

    @property
    def layers(self) -> list[LayerKV]:
        return self.cache.layers

    @property
    def seen(self) -> int:
        """Tokens run through the model so far: the next token's position."""
        return self.cache.get_seq_length()

    def rotary(self, config: Any, seq_len: int, trained: int) -> Rotary:
        """RoPE frequencies for a sequence of ``seq_len`` tokens, recomputed only when the
        position method's frequency key changes (Dynamic NTK's base grows with the length)."""
        key = self.position.frequency_key(seq_len, trained)
        if self._rotary is None or self._rotary[0] != key:
            self._rotary = (key, self.position.rotary(config, seq_len))
        return self._rotary[1]

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def offloaded_nbytes(self) -> int:
        return self.cache.offloaded_nbytes()

    def mean_entries(self) -> float:
        return self.cache.mean_entries()

    def mark(self) -> CacheMark:
        """Where the sequence stands; snapshots are taken when the recipe evicts while decoding."""
        compress = self.recipe.compress
        return self.cache.mark(snapshot=compress is not None and compress.evicts_while_decoding)

    def rollback(self, mark: CacheMark) -> None:
        self.cache.rollback(mark)

    def fork(self) -> Sequence:
        """A sequence that starts where this one stands and goes its own way: several requests
        answered at once on one stored context each decode on a fork (the server), where one
        request at a time could append and roll back. Costs no copy until the fork appends."""
        return Sequence(self.recipe, self.cache.fork(), self.prepared)


__all__ = ["KVCache", "Sequence"]
