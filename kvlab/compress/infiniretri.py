"""InfiniRetri: read the prompt chunk by chunk, keep what the model's own attention retrieves.

Ye et al., "Infinite Retrieval: Attention Enhanced LLMs in Long-Context Processing",
arXiv:2502.12962. The long input is read in chunks; each chunk is encoded together with the
cache kept from the chunks before it, the attention of the question's tokens over everything
in that window is summed over heads and smoothed by a 1-D convolution (phrase-level rather
than token-level scores), and the top-``K`` tokens make the cache for the next chunk; the
rest is dropped. The paper reports needle retrieval over 1M tokens with a 0.5B model.

Why it is a compress method here (the issue lists it in the retrieve stage): it decides what
the *cache* keeps, between prefill chunks, and the rest is gone for good; the retrieve
contract only chooses what one decoding step reads from a cache kept whole. In kvlab the
prefill of a context is already chunked (:meth:`Engine.chunks`, ``Engine.prefill_chunk``
tokens, :attr:`Phase.CONTEXT`): after the attention of every chunk, :meth:`observe` shrinks
the layer to ``budget`` entries, so the next chunk attends to the kept entries plus itself,
as in the paper; after the last chunk the layer is shrunk the same way (the base
:meth:`compress`), and the cache that answers is those ``budget`` entries.

Faithful: the score ``s_j = sum_h sum_i softmax(q_i K^T / sqrt(d))_hij`` over all query heads
of the layer and the window queries, smoothed by a 1-D convolution of width ``kernel``
(a sum, as the paper's convolution of ones: the same ranking as average pooling), one choice
shared by every head; the ``budget - window`` best entries are kept plus the window itself.

Different from the paper:

- the voting queries are the chunk's last ``window`` tokens, not the question appended to
  every chunk: kvlab's context is encoded before a session's question is known (when the
  question ends the prompt, the last chunk's window is the question, as in the paper);
- each layer selects with its own attention (the paper reads one upper layer's attention and
  keeps token ids, re-encoding them with the next chunk); kvlab keeps the layer's KV entries
  at their original positions, so nothing is recomputed;
- whole tokens, not whole sentences: the paper caches the sentences that contain its top
  tokens; kvlab's storage knows no sentence bounds;
- the chunk size is the engine's ``prefill_chunk`` (a method cannot change the engine's
  chunking); a prompt of one chunk is compressed once, like SnapKV with shared selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.compress.base import ScoredCompression, apply_keep, shared_or_per_head
from kvlab.engine.context import LayerContext, Phase
from kvlab.errors import RecipeError
from kvlab.registry import Budget, param, register


@register
@dataclass(frozen=True)
class InfiniRetri(ScoredCompression):
    name: ClassVar[str] = "infiniretri"
    paper: ClassVar[str] = "Ye et al., Infinite Retrieval (InfiniRetri), arXiv:2502.12962"
    summary: ClassVar[str] = (
        "Chunked reading: after every prefill chunk keep the top entries by the window's "
        "head-summed, convolved attention (one choice for all heads)."
    )

    budget: Budget = param(1024, "entries kept after each chunk (window included)")
    window: int = param(32, "last tokens of each chunk whose attention retrieves", min=1, max=512)
    kernel: int = param(5, "width of the 1-D convolution over the scores (odd)", min=1, max=63)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel % 2 == 0:
            raise RecipeError(f"infiniretri(kernel={self.kernel}): the convolution width must be odd")

    def observe(self, q: Tensor, ctx: LayerContext) -> None:
        """After a chunk's attention (not the last: :meth:`compress` follows it), keep the
        retrieved entries as the cache the next chunk reads."""
        if ctx.phase is Phase.CONTEXT:
            apply_keep(ctx.layer, self.keep(q, ctx))

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """One index set for every head (the scores are shared), stored as shared positions."""
        keep = super().keep(q, ctx)
        if keep is None or keep.dim() == 1:
            return keep
        return shared_or_per_head(keep[:, 0], ctx.layer.kv_heads)

    def score(self, q_window: Tensor, ctx: LayerContext, window: int) -> Tensor:
        q_pos = ctx.positions[-window:]
        probs = torch.softmax(ctx.logits(q_window, q_pos), dim=-1)  # [b, Hq, w, n]
        votes = probs[..., : probs.shape[-1] - window].sum(dim=(1, 2))  # [b, n - w]
        b, m = votes.shape
        ones = torch.ones(1, 1, self.kernel, dtype=votes.dtype, device=votes.device)
        smoothed = F.conv1d(votes[:, None], ones, padding=self.kernel // 2)[:, 0]
        return smoothed[:, None].expand(b, ctx.layer.kv_heads, m)
