"""The position stage: how token positions enter attention (RoPE and its variants).

A drop-in method only changes the rope parameters (:meth:`PositionMethod.rope_parameters`).
A method that gives near and far keys different positions keeps keys *before* RoPE
(:attr:`PositionMethod.stores_pre_rope`) and overrides :meth:`PositionMethod.logits` /
:meth:`PositionMethod.attend`, rotating q and k itself with the positions it chooses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from kvlab.engine.kernels import causal_allowed, causal_mask, dense_attention, masked_logits
from kvlab.engine.rotary import Rotary, rope_frequencies
from kvlab.registry import Method


@dataclass(frozen=True)
class PositionMethod(Method):
    """Base of position methods; by itself it is RoPE as the model was trained."""

    stage: ClassVar[str] = "position"
    own_attention: ClassVar[bool] = False
    """True when the method computes attention itself, giving (query, key) pairs positions of
    their own (:mod:`kvlab.position.passes`): a kernel that rotates keys by plain RoPE at their
    positions cannot stand in for it."""

    @property
    def stores_pre_rope(self) -> bool:
        """Keep keys unrotated in the cache and rotate them at attention time."""
        return False

    def rope_parameters(self, config: Any) -> dict[str, Any] | None:
        """transformers rope parameters that replace the model's (None: keep them)."""
        return None

    def prepare(self, engine: Any) -> PositionMethod | None:
        """This method as it runs on ``engine``'s model, where that needs the model (DPE's
        ``scales=calibrated``); the engine attends with it in place of this one (it reaches
        :attr:`ForwardContext.position` as ``prepared["position"]``). Kept cheap: it is also
        asked for the context window. None: this method as it is."""
        return None

    def context_window(self, trained: int) -> int:
        """Tokens the model can attend over with this method, given its trained length."""
        return trained

    def frequency_key(self, seq_len: int, trained: int) -> int | None:
        """Frequencies are recomputed when this key changes (None: they never do)."""
        return None

    def rotary(self, config: Any, seq_len: int) -> Rotary:
        """The RoPE frequencies to use when the sequence is ``seq_len`` tokens long."""
        inv_freq, attention_factor = rope_frequencies(config, self.rope_parameters(config), seq_len)
        return Rotary(inv_freq, attention_factor, int(config.max_position_embeddings))

    def logits(
        self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, rotary: Rotary, scaling: float
    ) -> Tensor:
        """Causal fp32 logits ``[b, Hq, t, n]`` of unrotated ``q`` over stored keys."""
        q = rotary.rotate(q, q_pos)
        if self.stores_pre_rope:
            keys = rotary.rotate(keys, k_pos)
        return masked_logits(q, keys, scaling, causal_allowed(q_pos, k_pos))

    def attend(
        self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, values: Tensor,
        rotary: Rotary, scaling: float, allowed: Tensor | None = None,
    ) -> Tensor:
        """Exact attention ``[b, Hq, t, d]`` of unrotated ``q`` over stored keys and values."""
        q = rotary.rotate(q, q_pos)
        if self.stores_pre_rope:
            keys = rotary.rotate(keys, k_pos)
        mask, is_causal = causal_mask(q_pos, k_pos, allowed, q.dtype)
        return dense_attention(q, keys, values, scaling, mask, is_causal)


@dataclass(frozen=True)
class TrainedRope(PositionMethod):
    """RoPE with the model's own parameters: the default when a recipe has no position method."""

    name: ClassVar[str] = "rope"
    paper: ClassVar[str] = "RoFormer (Su et al., 2021), arXiv:2104.09864"
    summary: ClassVar[str] = "RoPE as the model was trained."


TRAINED_ROPE = TrainedRope()
