"""GemFilter: an early layer picks the tokens, the whole model re-reads only those.

Shi et al., "Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with 1000x
Input Token Reduction", arXiv:2409.17422 (2024). The context runs through layers ``0..r`` only
(``r = 13`` of 32 in the paper: ``filter_layer`` is that fraction of the depth). At layer
``r`` the last query token scores every key, ``s_j = sum_h q_last,h . k_j,h`` (rotated, summed
over the query heads; kvlab's logits carry the constant ``1/sqrt(d)``, which does not change
the order), smoothed by average pooling (kernel 5); the top ``k`` (1024) tokens, in their
original order, are then prefilled through the whole model as a new, shorter prompt at fresh
contiguous positions ``0..k-1``, and decoding continues from that cache.

Engine seams: :meth:`GemFilter.select_tokens` (asked before a context prefill) with the
engine's probe, which stops the forward inside layer ``r``'s attention; the probe is chunked
like any prefill (only the last chunk's last query votes). The re-prefill is an ordinary
context prefill, so a compress method composes (it compresses the ``k`` selected tokens).
Session questions (appended prompts) are not filtered. On a model with sliding-window layers
(Gemma-3) the filter layer must be a global one: a local layer's last query sees only its
window, so it cannot score the whole context (refused with the layer's index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kvlab.engine.context import LayerContext
from kvlab.errors import RecipeError
from kvlab.prefill.base import PrefillMethod, Probe, layer_at
from kvlab.registry import Budget, param, register, resolve_budget


@register
@dataclass(frozen=True)
class GemFilter(PrefillMethod):
    name: ClassVar[str] = "gemfilter"
    paper: ClassVar[str] = "Shi et al., Discovering the Gems in Early Layers (GemFilter), arXiv:2409.17422"
    summary: ClassVar[str] = "Early-layer last-query scores pick k tokens; the model re-prefills only those."
    selects_tokens: ClassVar[bool] = True

    filter_layer: float = param(
        13 / 32, "filter layer r as a fraction of the depth (13/32: layer 13 of 32, the paper's)",
        min=0.0, max=1.0,
    )
    topk: Budget = param(1024, "tokens kept: a count, or a fraction of the context")
    kernel: int = param(5, "average-pooling kernel of the scores (odd)", min=1, max=63)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel % 2 == 0:
            raise RecipeError(f"{self.name}(kernel={self.kernel}): the pooling kernel must be odd")

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        return None  # attention itself stays dense

    def scores(self, q: Tensor, ctx: LayerContext) -> Tensor:
        """Pooled scores ``[n]`` of the layer's keys by the last query ``q[..., -1, :]``."""
        logits = ctx.logits(q[:, :, -1:], ctx.positions[-1:])  # [b, Hq, 1, n]
        summed = logits[0, :, 0].sum(dim=0)  # over the query heads
        return F.avg_pool1d(summed[None, None], self.kernel, stride=1, padding=self.kernel // 2)[0, 0]

    def select_tokens(self, ids: list[int], probe: Probe, num_layers: int) -> list[int]:
        k = resolve_budget(self.topk, len(ids))
        if k >= len(ids):
            return ids
        layer = layer_at(self.filter_layer, num_layers)
        q, ctx = probe(layer)
        if ctx.layer.window is not None:
            raise RecipeError(
                f"{self.name}(filter_layer={self.filter_layer}) filters at layer {layer} of {num_layers}, "
                f"a sliding-window layer whose last query sees only the last {ctx.layer.window} "
                "tokens, not the whole context; choose a filter_layer that falls on a global "
                "(full-attention) layer"
            )
        keep = self.scores(q, ctx).topk(k).indices.sort().values
        return [ids[i] for i in keep.tolist()]
