"""APE: documents encoded once, apart, and attended together with a temperature and a scale.

Yang, Chen and Chen, "APE: Faster and Longer Context-Augmented Generation via Adaptive
Parallel Encoding", ICLR 2025, arXiv:2502.05431 (training-free; the authors' code:
github.com/Infini-AI-Lab/APE, ``ape/ape_llama.py``).

Parallel encoding, with APE's three alignments to sequential encoding:

1. **Shared prefix.** Every document is encoded on its own, after the same prefix
   ``P`` (a chat template's start, an instruction): its tokens attend causally to the prefix
   and to themselves, at positions ``|P| .. |P| + L_i - 1``. Each document's cache depends
   only on the prefix and itself, so it is encoded once and joined with any others, in any
   order (:mod:`kvlab.reuse.documents` encodes and joins).
2. **Positions.** The documents share positions (all start at ``|P|``); the question starts
   at ``|P| + max_i L_i``, after the longest document (the authors' ``past_position.max() + 1``).
3. **Attention temperature and scaling factor.** A query of the question (and every
   generated token) attends over two parts of the cache: the documents ``C`` (all of them,
   at temperature ``T``) and the rest ``O`` (the prefix, and causally the question and the
   tokens generated so far, as usual). With ``x_j = q.k_j / sqrt(d)``:

   - ``out_C = softmax_{j in C}(x_j / T) V_C``,  ``lse_C = log sum_{j in C} exp(x_j / T)``
   - ``out_O = softmax_{j in O}(x_j) V_O``,       ``lse_O = log sum_{j in O} exp(x_j)``
   - ``out = (w_C out_C + w_O out_O) / (w_C + w_O)`` with ``w_C = exp(S T lse_C)``,
     ``w_O = exp(lse_O)``: a log-sum-exp merge of the parts in which the documents' part
     enters with its log-sum-exp multiplied by ``S * T`` (the authors' ``lse_context *
     scale * temperature``). Pair by pair, a document key ``j`` gets the weight
     ``exp(x_j / T) * Z_C^(S T - 1) / (Z_C^(S T) + Z_O)`` (``Z_C = sum_C exp(x_j / T)``,
     ``Z_O = sum_O exp(x_j)``), a prefix or question key ``exp(x_j) / (Z_C^(S T) + Z_O)``.

   With ``T = S = 1`` this is exact softmax attention over the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.engine.kernels import merge_partials, partial_attention
from kvlab.errors import RecipeError
from kvlab.registry import param, register
from kvlab.reuse.base import DOCUMENTS, DocumentSpan, ReuseMethod


@register
@dataclass(frozen=True)
class Ape(ReuseMethod):
    """Adaptive Parallel Encoding over documents encoded apart after a shared prefix."""

    name: ClassVar[str] = "ape"
    paper: ClassVar[str] = "Yang et al., APE: Adaptive Parallel Encoding, ICLR 2025, arXiv:2502.05431"
    summary: ClassVar[str] = ("Documents encoded once each after a shared prefix, joined in any order; the "
               "question attends over them with a temperature and a scaling factor.")

    temperature: float = param(
        0.9, "attention temperature T of the question over the documents (logits / T); "
        "the authors' default 0.9, in (0, 1]", max=1.0,
    )
    scale: float = param(
        0.9, "scaling factor S: the documents' log-sum-exp enters the merge times S * T; "
        "the authors' default 0.9, in (0, 1]", max=1.0,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("temperature", "scale"):
            value = getattr(self, name)
            if not value > 0.0:
                raise RecipeError(f"ape({name}={value!r}): must be > 0 and <= 1.0 (the paper's range)")

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        span = ctx.layer.side.get(DOCUMENTS)
        if not isinstance(span, DocumentSpan) or ctx.phase.observed:
            return None
        layer = ctx.layer
        keys, values, k_pos = layer.keys, layer.values, layer.key_positions()
        # fp32 logits x_j = q.k_j / sqrt(d) [b, Hq, t, n], -inf where a key is after the query
        logits = ctx.position.logits(q, ctx.positions, keys, k_pos, ctx.rotary, ctx.scaling)
        ctx.count_pairs(torch.isfinite(logits).sum())  # (documents share positions: not sorted)
        start, end = span.start, span.end
        docs_out, docs_lse = partial_attention(logits[..., start:end] / self.temperature, values[:, :, start:end])
        other_logits = torch.cat([logits[..., :start], logits[..., end:]], dim=-1)
        other_values = torch.cat([values[:, :, :start], values[:, :, end:]], dim=2)
        other_out, other_lse = partial_attention(other_logits, other_values)
        out = merge_partials([(docs_out, docs_lse * (self.scale * self.temperature)), (other_out, other_lse)])
        return out.to(q.dtype)


__all__ = ["Ape"]
