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

- Statistics come from the unrotated queries ``q`` kvlab hands the compress method: the last
  prefill chunk (the whole prompt when it fits one chunk). kvpress projects every prompt
  hidden state; for a prompt of several chunks the earlier chunks' queries are not seen here.
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
from kvlab.engine.attention import LayerContext
from kvlab.engine.rotary import Rotary, apply_rotation
from kvlab.registry import Budget, param, register, resolve_budget


def average_rotation(rotary: Rotary, positions: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``[d]`` of the mean RoPE rotation over ``positions``:
    ``R x = x * cos + rotate_half(x) * sin`` (RoPE is linear in cos and sin)."""
    cos, sin = rotary.cos_sin(positions, torch.float32)
    return cos.mean(dim=0), sin.mean(dim=0)


def query_statistics(q: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[b, Hq, d]`` and covariance ``[b, Hq, d, d]`` of queries ``[b, Hq, t, d]``
    (population covariance, as kvpress)."""
    q = q.float()
    mean = q.mean(dim=2)
    centred = q - mean[:, :, None]
    return mean, centred.transpose(-1, -2) @ centred / q.shape[2]


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

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        n = ctx.layer.num_entries
        budget = resolve_budget(self.budget, n)
        if n <= budget:
            return None
        sink = min(self.sink, budget)
        scores = self.score(q, ctx, sink)  # [b, kv_heads, n - sink]
        top = scores.topk(budget - sink, dim=-1).indices + sink
        sinks = torch.arange(sink, device=q.device).expand(*top.shape[:-1], sink)
        return torch.cat([sinks, top], dim=-1).sort(dim=-1).values

    def score(self, q: Tensor, ctx: LayerContext, sink: int) -> Tensor:
        """Expected attention ``[b, kv_heads, n - sink]`` of the entries after the sinks."""
        positions = ctx.step.positions[-q.shape[2] :]
        observed = q[:, :, positions >= sink]
        mean, cov = query_statistics(observed if observed.shape[2] else q)
        future = torch.arange(ctx.layer.seen, ctx.layer.seen + self.future, device=q.device)
        cos, sin = average_rotation(ctx.step.rotary, future)

        def rotate(x: Tensor) -> Tensor:  # x R^T: the mean rotation R applied to each row
            return apply_rotation(x, cos, sin)

        mean = rotate(mean)  # R mu
        keys = attention_keys(ctx)[:, :, sink:].float()  # [b, kv_heads, m, d]
        b, kv_heads, m, d = keys.shape
        group = q.shape[1] // kv_heads
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
