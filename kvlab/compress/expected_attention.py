"""Expected Attention: score entries by the attention that *future* queries are expected to
pay them, under a Gaussian model of the queries.

Devoto, Jeblick and Jégou, "Expected Attention: KV Cache Compression by Estimating Attention
from Future Queries Distribution", arXiv:2510.00636 (kvpress's ``ExpectedAttentionPress``).
Per query head, queries are modelled as ``q ~ N(mu, Sigma)``. For a Gaussian,
``E[exp(s q.k)] = exp(s mu.k + s^2 k^T Sigma k / 2)`` (``s`` the attention scaling), so the
expected attention of entry ``j`` is the softmax over entries of
``s mu'.k_j + s^2 k_j^T Sigma' k_j / 2``. Future queries sit at the next ``future`` positions
after the prompt; RoPE rotates them there, and, as in kvpress, the statistics are moved by the
*average* rotation over those positions: ``mu' = R mu``, ``Sigma' = R Sigma R^T`` with
``R = mean_p R_p``. Scores are averaged over the query heads of a KV head (GQA), multiplied by
``||v_j||`` (an entry's contribution to the output scales with its value), and each KV head
keeps its top entries; the first ``sink`` entries are always kept and neither enter the softmax
nor the statistics (kvpress's ``n_sink``).

Query-agnostic: nothing depends on which question follows. Defaults are kvpress's
(``n_future_positions=512``, ``n_sink=4``, covariance and value norm on, ``epsilon=0``).

What kvlab approximates or does differently:

- Statistics come from every query of the context prefill after the sinks: each prefill chunk
  adds its queries' sums to running moments (:class:`QueryMoments`, float64, held only until
  the compression), so a prompt of several chunks is summarised whole, as kvpress does from
  every prompt hidden state.
- kvpress rebuilds queries as ``W_q h`` (no bias, and it refuses models with q/k norms);
  kvlab uses the model's actual queries, so biases (Qwen2) and q-norms (Qwen3) are included.
- The average rotation is a first-order summary of the mixture over future positions (kvpress
  notes that the exact mixture estimated attention better but scored lower end to end).
- Keys are taken as attention sees them at their own positions (rotated first when the
  position method stores them pre-RoPE); with Self-Extend, far keys' grouped positions are
  not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlab.compress.base import CompressMethod, attention_keys
from kvlab.engine.context import LayerContext
from kvlab.engine.rotary import Rotary, apply_rotation
from kvlab.registry import Budget, param, register, resolve_budget


def average_rotation(rotary: Rotary, positions: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``[d]`` of the mean RoPE rotation over ``positions``:
    ``R x = x * cos + rotate_half(x) * sin`` (RoPE is linear in cos and sin)."""
    cos, sin = rotary.cos_sin(positions, torch.float32)
    return cos.mean(dim=0), sin.mean(dim=0)


MOMENTS = "expected_attention.moments"


class QueryMoments:
    """Running count, sum and sum of outer products of queries ``[b, Hq, t, d]`` (float64):
    the mean and population covariance of every query seen, whatever the chunking."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, q: Tensor) -> None:
        q = q.double()
        total, outer = q.sum(dim=2), q.transpose(-1, -2) @ q
        if self.total is None:
            self.total, self.outer = total, outer
        else:
            self.total, self.outer = self.total + total, self.outer + outer
        self.count += q.shape[2]

    def statistics(self) -> tuple[Tensor, Tensor]:
        """Mean ``[b, Hq, d]`` and covariance ``[b, Hq, d, d]``, float32 (as kvpress: population)."""
        mean = self.total / self.count
        cov = self.outer / self.count - mean[..., :, None] * mean[..., None, :]
        return mean.float(), cov.float()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.total, self.outer) if t is not None)

    def truncate(self, num_entries: int) -> None:
        """Moments describe queries, not entries: nothing to drop."""

    def on_select(self, keep: Tensor) -> None:
        """Moments describe queries, not entries: nothing to drop."""


def query_statistics(q: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[b, Hq, d]`` and covariance ``[b, Hq, d, d]`` of queries ``[b, Hq, t, d]``
    (population covariance, as kvpress)."""
    moments = QueryMoments()
    moments.add(q)
    return moments.statistics()


@register
@dataclass(frozen=True)
class ExpectedAttention(CompressMethod):
    name: ClassVar[str] = "expected_attention"
    paper: ClassVar[str] = "Devoto et al., Expected Attention (kvpress), arXiv:2510.00636"
    summary: ClassVar[str] = "Expected attention of future queries (Gaussian model) x ||v||."

    budget: Budget = param(2048, "entries kept per layer and KV head (sinks included)")
    future: int = param(512, "future query positions whose RoPE rotation is averaged", min=1)
    sink: int = param(4, "first entries always kept, left out of scores and statistics", min=0)
    covariance: bool = param(True, "include the query covariance term (else the mean only)")
    value_norm: bool = param(True, "multiply the expected attention by ||v||")
    epsilon: float = param(0.0, "added to the expected attention before the ||v|| product", min=0.0)

    def observe(self, q: Tensor, ctx: LayerContext) -> None:
        """Add this prefill chunk's queries after the first ``sink`` positions to the moments."""
        moments = ctx.layer.side.setdefault(MOMENTS, QueryMoments())
        observed = q[:, :, ctx.positions[-q.shape[2] :] >= self.sink]
        if observed.shape[2]:
            moments.add(observed)

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        moments = ctx.layer.side.pop(MOMENTS, None)  # held only until the compression
        n = ctx.layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        sink = min(self.sink, budget)
        if isinstance(moments, QueryMoments) and moments.count:
            statistics = moments.statistics()
        else:  # called without the engine's observe, or every query is a sink
            statistics = self.statistics(q, ctx)
        scores = self.score(statistics, ctx, sink, q.shape[1])  # [b, kv_heads, n - sink]
        top = scores.topk(budget - sink, dim=-1).indices + sink
        sinks = torch.arange(sink, device=q.device).expand(*top.shape[:-1], sink)
        return torch.cat([sinks, top], dim=-1).sort(dim=-1).values

    def statistics(self, q: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        """Query mean and covariance from the queries ``q`` of this forward alone."""
        positions = ctx.positions[-q.shape[2] :]
        observed = q[:, :, positions >= self.sink]
        return query_statistics(observed if observed.shape[2] else q)

    def score(
        self, statistics: tuple[Tensor, Tensor], ctx: LayerContext, sink: int, query_heads: int
    ) -> Tensor:
        """Expected attention ``[b, kv_heads, n - sink]`` of the entries after the sinks, for
        queries of mean and covariance ``statistics`` (``[b, Hq, d]``, ``[b, Hq, d, d]``)."""
        mean, cov = statistics
        device = mean.device
        future = torch.arange(ctx.layer.seen, ctx.layer.seen + self.future, device=device)
        cos, sin = average_rotation(ctx.rotary, future)

        def rotate(x: Tensor) -> Tensor:  # x R^T: the mean rotation R applied to each row
            return apply_rotation(x, cos, sin)

        mean = rotate(mean)  # R mu
        keys = attention_keys(ctx)[:, :, sink:].float()  # [b, kv_heads, m, d]
        b, kv_heads, m, d = keys.shape
        group = query_heads // kv_heads
        keys = keys[:, :, None]  # [b, kv_heads, 1, m, d], broadcast over the group
        s = ctx.scaling
        logits = s * (keys @ mean.reshape(b, kv_heads, group, d, 1))[..., 0]  # [b, kv, g, m]
        if self.covariance:
            cov = rotate(rotate(cov).transpose(-1, -2))  # R Sigma R^T (Sigma symmetric)
            cov = cov.reshape(b, kv_heads, group, d, d)
            logits = logits + s * s / 2 * ((keys @ cov) * keys).sum(dim=-1)
        expected = torch.softmax(logits, dim=-1).mean(dim=2)  # [b, kv_heads, m]
        if self.value_norm:
            values = ctx.layer.values[:, :, sink:].float()
            expected = (expected + self.epsilon) * values.norm(dim=-1)
        return expected
