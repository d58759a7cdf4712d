"""WindowKV: keep whole windows of consecutive tokens, chosen once per group of layers.

Zuo et al., "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for Efficient LLM
Inference", arXiv:2503.17922 (reference code: optim996/WindowKV, ``WindowKVCluster``).

Within a layer, with ``n`` entries, the last ``suffix`` queries of the prompt vote as in
SnapKV: ``A = softmax(Q_suffix K^T / sqrt(d))`` (causal, fp32), ``s_j = sum_i A_ij`` per query
head, for the *review region* ``j < n - suffix``. The review region is cut into windows of
``window_size`` consecutive entries (from index 0; the last window may be shorter). A window's
score pools over the batch, the query heads and the window:

- ``average`` (aggregation tasks: summaries, counting): the mean of ``s`` over the window;
- ``max`` (localisation tasks: QA, retrieval): each head's ``top`` largest ``s`` in the
  window (``top = window_size // 2 = 4``), then the mean of those values over the heads.

The paper picks the strategy with a BERT task classifier; kvlab exposes it as ``strategy``
(the classifier weights are not available offline). With ``c_l`` review entries allowed in
layer ``l``, the ``ceil((n_review - c_l) / window_size)`` lowest-scored windows are dropped
(all of them when that covers the review region) and the suffix is kept whole. One window set
serves every KV head (and every batch row, as in the reference code, which averages over the
batch too), so the layer stores one shared position tensor ``[k]``.

**Layer groups.** Layers are grouped by ``shared_layers`` (layer ``l`` is in group
``l // shared_layers``). Only the first layer of a group scores; the other layers of the group
keep the same entries (the reference's ``cached_selected_window_indices``). The choice travels
from layer to layer in the forward's scratch space (``ctx.scratch``: the engine creates
one :class:`~kvlab.engine.forward.ForwardContext` per forward, shared by its layers and dropped
with it). A layer whose group leader left no choice for this forward (it kept everything, or
held a different number of entries) scores for itself.

**Group budgets** decay arithmetically with depth while their mean is the budget. With
``B = budget`` entries per layer on average (suffix included) and ``C = B - suffix`` review
entries, ``G = ceil(L / shared_layers)`` groups of sizes ``s_g``:

    last = C * shared_layers / beta,  first = 2C - last
    (if first > n_review: first = n_review, last = 2C - first)
    c_g = first - g * (first - last) / (G - 1) + shift,
    shift = C - sum_g s_g (first - g (first - last) / (G - 1)) / L

so ``sum_g s_g c_g / L = C`` exactly: when ``L`` is a multiple of ``shared_layers`` the groups
are equal and ``shift = 0`` (the reference's pyramid); a shorter last group would otherwise
pull the mean up, and the shift moves every group by the same amount. Layer ``l`` of group
``g`` is allowed ``round(c_g)`` review entries (at least 0) plus the suffix, so the mean over
layers is ``B`` within rounding. ``G = 1`` (fewer layers than ``shared_layers``) gives every
layer ``B``. Because whole windows are dropped, a layer keeps between ``c_l`` and
``c_l + window_size - 1`` review entries (the reference does the same).

Defaults follow the reference script (``script/windowkv.sh``, ``args_demo.py``): review
windows of 8, ``shared_layers=8``, ``beta=14``, suffix 32 for ``max`` and 16 for ``average``,
budget 2048. Differences from the reference code, on purpose:

- its ``max_capacity_prompt`` counts review entries only; kvlab's ``budget`` includes the
  suffix, as every kvlab budget does (reference ``max_capacity_prompt=M`` is
  ``budget = M + suffix``);
- it rounds ``last`` and the group step down (integer division), assumes ``L`` is a multiple of
  ``shared_layers`` with at least two groups, and does not clamp ``first`` to the context;
  kvlab rounds each group's budget to the nearest integer, handles any ``L`` and clamps as
  PyramidKV does, so the mean over layers is the budget;
- its group followers reuse the class-level cache of the last leader that *dropped* something,
  which can be stale (a leader that kept only the suffix does not update it); kvlab's followers
  always reuse their own leader's choice of the same forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from kvlab.compress.base import CompressMethod
from kvlab.engine.context import LayerContext
from kvlab.errors import RecipeError
from kvlab.registry import Budget, param, register, resolve_budget

SUFFIX = {"max": 32, "average": 16}
"""Default suffix (observation window) per strategy: reference ``suffix_max``, ``suffix_avg``."""


GROUP_CHOICES = "windowkv.groups"
"""Scratch key: group -> (entries the group's first layer held, its keep ``[k]``)."""


def group_budgets(
    budget: int, suffix: int, context: int, num_layers: int, shared_layers: int, beta: float
) -> list[int]:
    """Entries each layer may keep (suffix included) for a mean ``budget`` over ``num_layers``
    layers of ``context`` entries (``context > budget``), groups of ``shared_layers`` layers."""
    groups = math.ceil(num_layers / shared_layers)
    if groups == 1:
        return [budget] * num_layers
    review, choose = context - suffix, budget - suffix
    last = choose * shared_layers / beta
    first = 2 * choose - last
    if first > review:
        first = review
        last = 2 * choose - first
    step = (first - last) / (groups - 1)
    sizes = [min(shared_layers, num_layers - g * shared_layers) for g in range(groups)]
    raw = [first - g * step for g in range(groups)]
    shift = choose - sum(s * c for s, c in zip(sizes, raw)) / num_layers
    per_group = [max(0, round(c + shift)) + suffix for c in raw]
    return [per_group[layer // shared_layers] for layer in range(num_layers)]


@register
@dataclass(frozen=True)
class WindowKV(CompressMethod):
    name: ClassVar[str] = "windowkv"
    paper: ClassVar[str] = "Zuo et al., WindowKV, arXiv:2503.17922"
    sliding_window_refusal: ClassVar[str | None] = (
        "it shares one total budget among all layers and one choice of windows within each group "
        "of adjacent layers, and the groups would mix sliding-window and global layers; use "
        "snapkv (one budget per global layer)"
    )
    summary: ClassVar[str] = "Whole 8-token windows by suffix votes; one choice per layer group."

    budget: Budget = param(
        2048, "entries kept per layer, averaged over layers (suffix included; reference: 2048)"
    )
    strategy: Literal["max", "average"] = param(
        "max", "window score: max (localisation, QA) or average (aggregation, summaries)"
    )
    suffix: int = param(
        0, "observation window: the last prompt queries that vote (0: 32 for max, 16 for average)",
        min=0, max=512,
    )
    window_size: int = param(8, "tokens per review window (reference: 8)", min=1, max=256)
    top: int = param(
        0, "max strategy: each head's largest votes averaged per window (0: window_size // 2)",
        min=0, max=256,
    )
    shared_layers: int = param(
        8, "layers per group; only a group's first layer scores (reference: 8)", min=1
    )
    beta: float = param(
        14.0, "budget decay: the last group keeps C * shared_layers / beta (reference: 14)", min=1.0
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < self.shared_layers:
            raise RecipeError(
                f"{self.name}(beta={self.beta}): must be >= shared_layers={self.shared_layers}, "
                "or the last group would keep more than the first"
            )

    @property
    def suffix_size(self) -> int:
        return self.suffix or SUFFIX[self.strategy]

    @property
    def top_votes(self) -> int:
        return self.top or max(1, self.window_size // 2)

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        n = ctx.layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        suffix = min(self.suffix_size, q.shape[2], budget)
        budgets = group_budgets(budget, suffix, n, ctx.num_layers, self.shared_layers, self.beta)
        review, allowed = n - suffix, budgets[ctx.index] - suffix
        if review <= allowed:
            return None
        group = ctx.index // self.shared_layers
        choices: dict[int, tuple[int, Tensor]] = ctx.scratch.setdefault(GROUP_CHOICES, {})
        shared = choices.get(group)
        if ctx.index % self.shared_layers != 0 and shared is not None and shared[0] == n:
            return shared[1]
        keep = self.choose(q[:, :, q.shape[2] - suffix :], ctx, suffix, allowed)
        choices[group] = (n, keep)
        return keep

    def choose(self, q_suffix: Tensor, ctx: LayerContext, suffix: int, allowed: int) -> Tensor:
        """Indices ``[k]`` (sorted) of the kept review windows and the suffix, when
        ``allowed`` review entries of ``n - suffix`` may stay."""
        n = ctx.layer.num_entries
        review, size = n - suffix, self.window_size
        scores = self.window_scores(q_suffix, ctx, suffix)  # [num_windows]
        windows = scores.shape[0]
        drop = min(windows, math.ceil((review - allowed) / size))
        order = torch.sort(scores, descending=True, stable=True).indices
        kept = order[: windows - drop].sort().values
        starts = kept * size
        index = (starts[:, None] + torch.arange(size, device=starts.device)).flatten()
        index = index[index < review]
        return torch.cat([index, torch.arange(review, n, device=index.device)])

    def window_scores(self, q_suffix: Tensor, ctx: LayerContext, suffix: int) -> Tensor:
        """One score per review window ``[ceil(n_review / window_size)]``, pooled over the
        batch, the query heads and the window as ``strategy`` says."""
        q_pos = ctx.positions[-suffix:]
        probs = torch.softmax(ctx.logits(q_suffix, q_pos), dim=-1)  # [b, Hq, suffix, n]
        votes = probs[..., : probs.shape[-1] - suffix].sum(dim=-2)  # [b, Hq, n_review]
        votes = votes.flatten(0, 1)  # [b * Hq, n_review]
        review, size = votes.shape[-1], self.window_size
        full, rest = divmod(review, size)
        blocks = votes[:, : full * size].reshape(votes.shape[0], full, size)
        scores = [self._pool(blocks)]
        if rest:
            scores.append(self._pool(votes[:, full * size :, None].transpose(1, 2)))
        return torch.cat(scores)

    def _pool(self, blocks: Tensor) -> Tensor:
        """``[rows, windows, w]`` votes -> ``[windows]`` scores."""
        if self.strategy == "average":
            return blocks.mean(dim=(0, 2))
        top = min(self.top_votes, blocks.shape[-1])
        return blocks.topk(top, dim=-1).values.mean(dim=(0, 2))
