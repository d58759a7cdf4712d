"""FastKV: token-selective propagation after an early layer, SnapKV-style KV selection.

Jo et al., "FastKV: KV Cache Compression for Fast Long-Context Processing with
Token-Selective Propagation", arXiv:2502.01068 (2025). The context is prefilled in one forward.
Layers ``0..tsp`` see every token. At the TSP layer (15 of 32 in the paper: ``tsp_layer`` is
that fraction of the depth) the last ``window`` queries score the tokens before them as SnapKV
does (softmax attention summed over the window, max-pooled with ``kernel`` 7), averaged over
all heads into one score per token; the top ``tsp_len = tsp_rate * n`` tokens plus the last
``window`` are kept, and only their hidden states, at their original positions, run through the
later layers, which therefore compute and hold only those tokens' KV. Every layer then keeps
``budget`` KV entries per KV head with the same SnapKV votes (window 8, max-pool 7).

Engine seams: :meth:`FastKV.attend` computes the layer's dense attention on the context's
forward, then asks ``ctx.propagate_only(rows)`` at the TSP layer (the engine's decoder-layer
pre-hook slices the hidden states and positions at the next layer) and selects the layer's KV
with :class:`~kvlab.compress.snapkv.SnapKV`'s scoring (not a copy). The propagation changes
what later layers see of the whole context, so the context is prefilled in one chunk
(``whole_context``), and FastKV is its own KV selection: a compress method is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvlab.compress.base import apply_keep, top_k_plus_window
from kvlab.compress.snapkv import SnapKV
from kvlab.engine.context import LayerContext, Phase
from kvlab.prefill.base import PrefillMethod, layer_at
from kvlab.registry import Budget, param, register


@register
@dataclass(frozen=True)
class FastKV(PrefillMethod):
    name: ClassVar[str] = "fastkv"
    paper: ClassVar[str] = "Jo et al., FastKV (token-selective propagation), arXiv:2502.01068"
    sliding_window_refusal: ClassVar[str | None] = (
        "it runs only the tokens an early layer selects through the later layers, so a "
        "sliding-window layer's window would hold other tokens than the last ones the model was "
        "trained to see; use gemfilter (the selected tokens re-read as a shorter prompt) or a "
        "compress method"
    )
    summary: ClassVar[str] = "Later layers run only tokens an early layer selects; SnapKV-style KV budget."
    whole_context: ClassVar[bool] = True
    selects_tokens: ClassVar[bool] = True
    selects_kv: ClassVar[bool] = True

    tsp_layer: float = param(
        15 / 32, "TSP layer as a fraction of the depth (15/32: layer 15 of 32, the paper's)",
        min=0.0, max=1.0,
    )
    tsp_rate: float = param(0.2, "fraction of the context propagated past the TSP layer", min=0.0, max=1.0)
    budget: Budget = param(2048, "KV entries kept per layer and KV head (window included)")
    window: int = param(8, "observation window: the last prompt queries that vote", min=1, max=512)
    kernel: int = param(7, "max-pooling kernel of the votes (odd)", min=1, max=63)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.snapkv()  # validates the pooling kernel

    def snapkv(self) -> SnapKV:
        """SnapKV with FastKV's window, max-pooling and budget: its votes and its selection."""
        return SnapKV(budget=self.budget, window=self.window, kernel=self.kernel, pooling="max")

    def propagated(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """Rows ``[tsp_len + window]`` (sorted) of the forward's tokens the later layers run:
        the top ``tsp_len`` by the window's votes averaged over heads, plus the window; None
        when that is every token."""
        n = q.shape[2]
        window = min(self.window, n)
        tsp_len = int(self.tsp_rate * n)
        if tsp_len + window >= n:
            return None
        votes = self.snapkv().score(q[:, :, n - window :], ctx, window)  # [b, kv_heads, n - w]
        return top_k_plus_window(votes.mean(dim=1, keepdim=True), tsp_len + window, window)[0, 0]

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        if ctx.phase is not Phase.CONTEXT_END:
            return None  # appended prompts (session questions): dense, nothing selected
        layer = ctx.layer
        out = ctx.attend(q, ctx.positions, layer.keys, layer.key_positions(), layer.values)
        if ctx.index == layer_at(self.tsp_layer, ctx.num_layers):
            rows = self.propagated(q, ctx)
            if rows is not None:
                ctx.propagate_only(rows)
        apply_keep(layer, self.snapkv().keep(q, ctx))
        return out
