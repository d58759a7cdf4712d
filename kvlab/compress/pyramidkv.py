"""PyramidKV: SnapKV's votes with a pyramid of layer budgets — more entries in lower layers.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv:2406.02069. Attention is spread widely in lower layers and concentrates in
higher ones, so budgets decrease arithmetically with depth while their mean stays the budget
``B``. With the observation window ``w``, ``C = B - w`` entries to choose per layer on average:

    min = C / beta,  max = 2C - min        (if max >= n - w: max = n - w, min = 2C - max)
    step = (max - min) / (L - 1),  layer l keeps  round(max - l * step) + w

so layer 0 keeps ``max + w`` and the last layer ``min + w``. Within a layer, entries are
chosen exactly as SnapKV chooses them (same scores, same parameters and defaults, which match
the reference code: window 32, kernel 5, avg pooling, budget 2048; ``beta=20``).

Differences from the reference code (KVCache-Factory ``PyramidKVCluster``), on purpose:
it rounds ``min`` and ``step`` down (integer division), so its layers keep a little less than
``B`` on average, and for prompts shorter than ``2C`` it falls back to SnapKV's uniform budget;
kvlab keeps the clamped pyramid for every prompt longer than ``B`` and rounds each layer's
budget to the nearest integer, so the mean over layers is ``B`` within rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvlab.compress.snapkv import SnapKV
from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register


def pyramid_budgets(
    budget: int, window: int, context: int, num_layers: int, beta: float
) -> list[int]:
    """Entries kept by each layer (window included) for a mean ``budget`` over
    ``num_layers`` layers of ``context`` entries (``context > budget``)."""
    choose = budget - window
    low = choose / beta
    high = 2 * choose - low
    if high >= context - window:
        high = context - window
        low = 2 * choose - high
    if num_layers == 1:
        return [budget]
    step = (high - low) / (num_layers - 1)
    return [round(high - layer * step) + window for layer in range(num_layers)]


@register
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    name: ClassVar[str] = "pyramidkv"
    paper: ClassVar[str] = "Cai et al., PyramidKV, arXiv:2406.02069"
    sliding_window_refusal: ClassVar[str | None] = (
        "it shares one total budget among all layers by depth, and a sliding-window layer keeps "
        "its window whatever its share; use snapkv (the same votes, one budget per global layer)"
    )
    summary: ClassVar[str] = "SnapKV votes; layer budgets shrink with depth, mean = budget."

    budget: Budget = param(2048, "entries kept per KV head, averaged over layers (window included)")
    beta: float = param(20.0, "pyramid steepness: the top layer chooses C / beta", min=1.0)

    def layer_budget(self, budget: int, window: int, ctx: LayerContext) -> int:
        budgets = pyramid_budgets(budget, window, ctx.layer.num_entries, ctx.num_layers, self.beta)
        return budgets[ctx.index]
