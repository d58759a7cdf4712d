"""CaM: merge what is evicted into what stays, with a probability set by attention.

Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024 (PMLR 235;
no arXiv version; openreview.net/forum?id=LCTmppB165; reference code: zyxxmu/cam). Evicting an
entry always perturbs the attention output; CaM lowers the perturbation by folding the evicted
entry's value into the entries that stay, more often the more attention the evicted entry drew.

kvlab's form, at the end of the prompt prefill, per KV head:

1. **Eviction** is SnapKV's (the base): the observation-window votes choose the kept entries
   (top ``budget - window`` plus the window), with SnapKV's parameters and defaults.
2. **Attention** ``A_j`` of every entry ``j``: the mean, over the observation-window queries
   that can see ``j`` (causal) and over the query heads of the KV head, of the softmax
   attention probability — unsmoothed, and an average rather than SnapKV's sum so that the
   window's own entries (seen by fewer queries) are not under-counted.
3. **Receivers** of an evicted entry ``j``: the next ``merge`` kept entries after it (fewer
   near the end of the cache: the reference code's slice is truncated the same way).
4. **Merge probability** ``p_j = clamp(A_j / mean(A over j's receivers), 0, 1)``: the
   reference attention is the mean attention of the entries that would receive ``j``, as in
   the reference's streaming code (``slicev``: ``accum_attn[start-1] /
   mean(accum_attn[start:start+merge_num])``).
5. With probability ``p_j`` (one Bernoulli draw per evicted entry and KV head),
   ``v_j / merge`` is added to the value of each receiver. Keys are never changed, and the
   evicted value's original ``v_j`` is what is merged (merges do not cascade).

The Bernoulli draws are reproducible: ``u = torch.rand([b, kv_heads, n])`` from a CPU
generator seeded with ``seed * num_layers + layer`` (distinct for every layer and seed), and
entry ``j`` merges when ``u_j < p_j``. ``merge=32`` is the reference's ``merge_budget``
(``cam_hf/utils_hh``, ``local_cam_mask``).

Differences from the reference, on purpose: the reference evicts one token per decoding step
from a sinks + recent-window cache (StreamingLLM/H2O style) and merges it into the next ``m``
tokens of the recent window; kvlab evicts all at once after the prompt with SnapKV's choice,
so the receivers are the next kept entries rather than the next positions. The reference's
lm-eval variant divides by the *max* attention of the kept tokens (``torch.max`` in a variable
named ``mean_attn``) and its HELM variant by the mean of the whole remaining recent window;
kvlab follows the streaming variant's mean over the receivers, the one reading that needs no
sink/recent split.
Compression while decoding (``decode_budget`` of the SnapKV family) is not offered: each
decoding eviction would need its own merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.compress.snapkv import SnapKVVoting
from kvlab.engine.context import LayerContext
from kvlab.engine.kernels import causal_allowed
from kvlab.registry import param, register, resolve_budget


def per_head(keep: Tensor, batch: int, kv_heads: int) -> Tensor:
    """A keep index ``[k]`` or ``[b, kv_heads, k]`` as ``[b, kv_heads, k]``."""
    if keep.dim() == 1:
        return keep.expand(batch, kv_heads, -1)
    return keep


def window_attention(q_window: Tensor, ctx: LayerContext) -> Tensor:
    """``A`` ``[b, kv_heads, n]``: each entry's attention probability averaged over the
    window queries ``q_window`` ``[b, Hq, w, d]`` (the last ``w`` positions) that can see it
    and over the query heads of its KV head."""
    w = q_window.shape[2]
    q_pos = ctx.positions[-w:]
    probs = torch.softmax(ctx.logits(q_window, q_pos), dim=-1)  # [b, Hq, w, n]
    seen = causal_allowed(q_pos, ctx.layer.key_positions()).sum(dim=-2)  # [n] or [b, kv, n]
    kv_heads = ctx.layer.kv_heads
    b, hq, _, n = probs.shape
    mean = probs.sum(dim=2).reshape(b, kv_heads, hq // kv_heads, n).mean(dim=2)
    return mean / seen.clamp(min=1)


def merge_deltas(
    values: Tensor, attention: Tensor, keep: Tensor, merge: int, draws: Tensor,
    probability: Tensor | None = None,
) -> Tensor:
    """What CaM adds to the kept values: ``[b, kv_heads, k, d]`` (fp32) for ``values``
    ``[b, kv_heads, n, d]``, attention ``A`` ``[b, kv_heads, n]``, sorted ``keep``
    ``[b, kv_heads, k]``, ``merge`` receivers and uniform ``draws`` ``[b, kv_heads, n]``.
    ``probability`` ``[b, kv_heads, n]`` replaces ``clamp(A_j / mean A(receivers), 0, 1)``.

    Vectorised with prefix sums over the kept slots: evicted entry ``j`` goes to the slots
    ``r_j .. r_j + merge - 1`` where ``r_j`` is the first kept slot after ``j``."""
    b, h, n, d = values.shape
    k = keep.shape[-1]
    positions = torch.arange(n, device=values.device).expand(b, h, n).contiguous()
    first = torch.searchsorted(keep.contiguous(), positions, right=True)  # [b, h, n] in 0..k
    evicted = torch.ones(b, h, n, dtype=torch.bool, device=values.device)
    evicted.scatter_(-1, keep, False)
    end = (first + merge).clamp(max=k)
    receivers = (end - first).clamp(min=0)
    if probability is None:
        kept_attention = attention.float().gather(-1, keep)
        prefix = torch.nn.functional.pad(kept_attention.cumsum(-1), (1, 0))  # [b, h, k + 1]
        reference = (prefix.gather(-1, end) - prefix.gather(-1, first)) / receivers.clamp(min=1)
        ratio = attention.float() / reference
        probability = torch.nan_to_num(ratio, nan=0.0, posinf=1.0).clamp(0.0, 1.0)
    merges = evicted & (receivers > 0) & (draws.to(values.device) < probability)
    # G[r] = sum of merged v_j with r_j = r; slot i receives sum_{r = i - merge + 1 .. i} G[r]
    grouped = torch.zeros(b, h, k + 1, d, device=values.device)
    contribution = values.float() * merges[..., None]
    grouped.scatter_add_(2, first[..., None].expand(-1, -1, -1, d), contribution)
    running = torch.nn.functional.pad(grouped[:, :, :k].cumsum(2), (0, 0, 1, 0))  # [b,h,k+1,d]
    slots = torch.arange(k, device=values.device)
    lower = (slots - merge + 1).clamp(min=0)
    return (running[:, :, slots + 1] - running[:, :, lower]) / merge


@register
@dataclass(frozen=True)
class CaM(SnapKVVoting):
    name: ClassVar[str] = "cam"
    paper: ClassVar[str] = (
        "Zhang et al., CaM: Cache Merging for Memory-efficient LLMs Inference, ICML 2024 "
        "(no arXiv id; openreview LCTmppB165)"
    )
    summary: ClassVar[str] = "SnapKV eviction; evicted values merged into the next kept entries."

    merge: int = param(
        32, "kept entries after an evicted one that share its value (reference: 32)", min=1
    )
    seed: int = param(0, "seed of the Bernoulli merge draws (reproducible per layer)", min=0)

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        return self.snapkv().keep(q, ctx)  # the eviction this method merges into

    def compress(self, q: Tensor, ctx: LayerContext) -> None:
        layer = ctx.layer
        keep = self.keep(q, ctx)
        if keep is None:
            return
        b, kv_heads, n, _ = layer.values.shape
        window = min(self.window, q.shape[2], resolve_budget(self.budget, n))
        q_window = q[:, :, q.shape[2] - window :]
        attention = window_attention(q_window, ctx)
        generator = torch.Generator().manual_seed(self.seed * ctx.num_layers + ctx.index)
        draws = torch.rand(b, kv_heads, n, generator=generator)
        indices = per_head(keep, b, kv_heads)
        deltas = merge_deltas(
            layer.values, attention, indices, self.merge, draws,
            self.merge_probability(attention, indices, ctx),
        )
        layer.select(keep)
        layer.values.copy_((layer.values.float() + deltas).to(layer.values.dtype))

    def merge_probability(
        self, attention: Tensor, keep: Tensor, ctx: LayerContext
    ) -> Tensor | None:
        """Merge probability ``[b, kv_heads, n]`` of every entry, or ``None`` for CaM's
        ``clamp(A_j / mean A(receivers), 0, 1)`` (a seam for ablations and tests)."""
        return None
