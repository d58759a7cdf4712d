"""TokenSelect: per-step token-level KV selection by soft voting of the query heads.

Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs
via Dynamic Token-Level KV Cache Selection", arXiv:2411.02886 (2024). At each decoding step,
in every layer from ``dense_layers`` on, the candidates are the entries ``j`` in
``[n_init, n - n_local)``; each query head ``h`` votes ``softmax_j(q_h . k_j)`` over them
and the votes are summed over the layer's query heads: ``S_j = sum_h softmax_j(q_h . k_j)``.
The top ``budget`` candidates by ``S`` are shared by all heads of the layer; the step
attends over the first ``n_init`` entries, the selected ones and the last ``n_local`` (the
step's own token included), re-positioned contiguously: the attended entries take positions
``0 .. m-1`` in storage order and the query takes ``m - 1``, the position of its own key (the
last attended entry). This is the paper's length extrapolation: no distance beyond ``m``.

Chunked prefill (``prefill_chunks``, on by default as in the paper): a prompt forward of ``t``
tokens (one of the engine's prefill chunks, ``Engine.prefill_chunk``; the paper's is 512)
selects the same way, its ``t`` queries voting together: ``S_j = sum_i sum_h softmax_j(q_hi .
k_j)`` over the chunk's queries ``i`` and the query heads ``h``. The local window is the
layer's last ``n_local`` entries and the whole chunk (``[min(n - n_local, n - t), n)``, ``n``
counting the chunk's own entries), so the candidates all precede the chunk; the chunk attends
to ``[0, n_init)`` + the top ``budget`` + that window, re-positioned as a decoding step is, its
query ``i`` at ``m - t + i`` (its own key's position) and causal within the chunk. A decoding
step is the case ``t = 1``. The first chunk, which has no earlier cache to select from, and
any chunk whose candidates do not outnumber ``budget`` attend densely. This is what the
paper's code does for a chunk no longer than ``n_local`` (its default chunk is 512, its
``n_local`` 512). Its code votes with the chunk's mean query (one vote per head: ``prefill_vote
= mean``, here the mean of the rotated queries); by default every query of the chunk votes,
which scores ``t x candidates`` products per head, as much as the chunk's dense attention
logits: on a 2-layer tiny model (8 query heads, one CPU thread) a 6,000-token prefill in
1,024-token chunks at ``budget=0.125`` took 4.5 s against dense's 1.5-2.0 s, and 0.8 s with
the mean vote, which scores ``t`` times fewer. The prefill stage owns the prompt's attention:
in a recipe with a prefill method, that method computes the prompt's attention and
TokenSelect selects while decoding only (``RetrieveMethod.attend_prefill`` is not asked).
``prefill_chunks=false`` keeps the prefill dense.

What is scored: the paper's code keeps keys before RoPE and scores ``q . k`` unrotated. kvlab
stores keys rotated at their original positions (unless the position method keeps them
pre-RoPE, which this method refuses), so scoring unrotated vectors would mean un-rotating
every candidate at every step. TokenSelect here scores the model's own logits instead: the
query rotated at its true position against the stored keys (RoPE at original positions),
scaled by the layer's attention scaling (products in the cache's dtype, softmax in fp32). The
attention over the selected set uses the contiguous positions (selected keys are rotated by
``new - original`` on the fly, one rotation of ``m`` entries).

Selection Cache: when ``selection_cache`` is above 0, a decoding step whose mean query (over
heads, unrotated) has cosine ``>= selection_cache`` with the previous step's mean query in
that layer reuses that step's indices (the paper: 0.9; off by default, as in its code). The
check is one host sync per layer and step, paid only when the cache is on. Prefill chunks
always select anew and leave the cache as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from kvlab.engine.cache import LayerKV
from kvlab.engine.context import LayerContext, Phase
from kvlab.engine.kernels import gather_entries
from kvlab.registry import Budget, param, register, resolve_budget
from kvlab.retrieve.base import RetrieveMethod

CACHE_KEY = "tokenselect.selection_cache"


class SelectionCache:
    """The previous step's mean query ``[b, d]`` and selected entries ``[b, k]`` of a layer."""

    def __init__(self, mean_query: Tensor, chosen: Tensor, entries: int) -> None:
        self.mean_query = mean_query
        self.chosen = chosen
        self.entries = entries  # layer entries when chosen (a truncate below drops it)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean_query, self.chosen))

    def on_select(self, keep: Tensor) -> None:
        self.chosen = self.chosen[:, :0]  # entries renumbered: never reuse

    def truncate(self, num_entries: int) -> None:
        if num_entries < self.entries:
            self.chosen = self.chosen[:, :0]


VOTE_BLOCK = 1 << 24
"""Most fp32 logits a vote holds at once (64 MiB): a prefill chunk's queries vote in blocks of
rows, so ``t`` queries over ``c`` candidates never build the whole ``[Hq, t, c]``."""


def soft_votes(q_rotated: Tensor, candidates: Tensor, scaling: float) -> Tensor:
    """``S_j = sum_i sum_h softmax_j(q_hi . k_j * scaling)`` ``[b, c]`` for rotated queries
    ``[b, Hq, t, d]`` (a decoding step: ``t = 1``; a prefill chunk: its ``t`` queries) and
    candidate keys ``[b, Hkv, c, d]`` (query head ``h`` reads KV head ``h // (Hq / Hkv)``)."""
    b, hq, t, d = q_rotated.shape
    kv_heads, c = candidates.shape[1], candidates.shape[2]
    grouped = q_rotated.reshape(b, kv_heads, (hq // kv_heads) * t, d).to(candidates.dtype)
    rows = grouped.shape[2]
    step = max(1, VOTE_BLOCK // max(1, b * kv_heads * c))  # rows of each KV head's group
    votes = None
    for start in range(0, rows, step):
        logits = torch.matmul(grouped[:, :, start : start + step], candidates.transpose(-1, -2))
        logits = logits.float() if logits.dtype != torch.float32 else logits
        part = torch.softmax(logits.mul_(scaling), dim=-1).sum(dim=(1, 2))
        votes = part if votes is None else votes + part
    return votes


def contiguous_attend(
    q: Tensor, ctx: LayerContext, entries: Tensor
) -> Tensor:
    """Attention of the forward's ``t`` queries ``q`` ``[b, Hq, t, d]`` over the layer entries
    ``entries`` ``[b, m]`` (sorted, shared by all heads, the queries' own entries the last
    ``t``), re-positioned at ``0 .. m-1`` with query ``i`` at ``m - t + i`` (causal)."""
    layer = ctx.layer
    b, m = entries.shape
    t = q.shape[2]
    per_head = entries[:, None].expand(-1, layer.kv_heads, -1)
    shape = (b, layer.kv_heads, m, layer.keys.shape[-1])
    keys = gather_entries(layer.keys, per_head, out=ctx.buffer("tokenselect.keys", shape, layer.keys))
    values = gather_entries(layer.values, per_head, out=ctx.buffer("tokenselect.values", shape, layer.values))
    new_pos = torch.arange(m, device=q.device)
    original = layer.key_positions()
    if layer.is_contiguous:
        original = entries[:, None]  # entry i holds token i
    elif original.dim() == 1:
        original = original[entries][:, None]  # [b, 1, m]
    else:
        original = original.gather(2, per_head)
    rotary = ctx.rotary
    keys = rotary.rotate(keys, new_pos - original)  # R(new) = R(new - old) R(old)
    if rotary.attention_factor != 1.0:
        keys = keys / rotary.attention_factor  # the factor was applied once when stored
    return ctx.attend(q, new_pos[m - t :], keys, new_pos, values)


@register
@dataclass(frozen=True)
class TokenSelect(RetrieveMethod):
    name: ClassVar[str] = "tokenselect"
    paper: ClassVar[str] = "Wu et al., TokenSelect, arXiv:2411.02886"
    summary: ClassVar[str] = (
        "Per-step top-k tokens by soft voting of all heads (decoding and prefill chunks); "
        "attended at contiguous positions."
    )
    needs_rotated_keys: ClassVar[bool] = True

    budget: Budget = param(2048, "selected candidates per step (or prefill chunk) and layer (top-k)")
    n_init: int = param(128, "first entries always attended", min=0)
    n_local: int = param(512, "last entries always attended (the step's own included)", min=1)
    selection_cache: float = param(
        0.0, "reuse the previous indices when cos(mean query, previous) >= this (0: off)",
        min=0.0, max=1.0,
    )
    dense_layers: int = param(0, "first layers that stay dense", min=0)
    prefill_chunks: bool = param(
        True, "select in each prefill chunk too, its queries voting together, as the paper "
        "(false: dense prefill; a recipe's prefill method computes the prefill instead)",
    )
    prefill_vote: Literal["queries", "mean"] = param(
        "queries", "how a prefill chunk votes: every query (queries) or the chunk's mean query "
        "(mean: the released code's, 1/t of the scoring work)",
    )

    def select(self, q: Tensor, ctx: LayerContext, top: int, local_start: int) -> Tensor:
        """Selected layer entries ``[b, top]`` (sorted) among ``[n_init, local_start)`` for the
        forward's queries ``q`` ``[b, Hq, t, d]``; a decoding step may take them from the
        selection cache when its mean query has barely moved."""
        layer = ctx.layer
        n = layer.num_entries
        cached_steps = self.selection_cache > 0 and ctx.phase is Phase.DECODE
        if cached_steps:
            mean_query = q.float().mean(dim=(1, 2))  # [b, d]
            cached = layer.side.get(CACHE_KEY)
            if isinstance(cached, SelectionCache) and cached.chosen.shape[1] == top:
                similarity = torch.cosine_similarity(mean_query, cached.mean_query, dim=-1)
                if bool((similarity >= self.selection_cache).all()):
                    cached.mean_query, cached.entries = mean_query, n
                    return cached.chosen
        candidates = layer.keys[:, :, self.n_init : local_start]
        voters = ctx.rotary.rotate(q, ctx.positions)
        if self.prefill_vote == "mean":
            voters = voters.mean(dim=2, keepdim=True)  # a chunk's fingerprint (one query: itself)
        votes = soft_votes(voters, candidates, ctx.scaling)
        chosen = votes.topk(top, dim=-1).indices.sort(dim=-1).values + self.n_init
        if cached_steps:
            layer.side[CACHE_KEY] = SelectionCache(mean_query, chosen, n)
        return chosen

    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """A decoding step (``t = 1``) or, from :meth:`attend_prefill`, a prompt chunk of ``t``
        tokens: the first ``n_init`` entries, the top ``budget`` candidates and the local
        window (the last ``n_local`` entries and the whole chunk), at contiguous positions."""
        layer = ctx.layer
        n, t = layer.num_entries, q.shape[2]
        top = resolve_budget(self.budget, n)
        local_start = min(n - self.n_local, n - t)
        if ctx.index < self.dense_layers or self.n_init + top >= local_start:
            return None
        chosen = self.select(q, ctx, top, local_start)
        b = chosen.shape[0]
        device = q.device
        init = torch.arange(self.n_init, device=device).expand(b, -1)
        local = torch.arange(local_start, n, device=device).expand(b, -1)
        return contiguous_attend(q, ctx, torch.cat([init, chosen, local], dim=-1))

    def attend_prefill(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """A prompt chunk selects as a decoding step does (see the module docstring)."""
        return self.attend(q, ctx) if self.prefill_chunks else None
