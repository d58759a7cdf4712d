"""LycheeDecode, training-free: a few retrieval heads pick the top-k blocks, the others reuse them.

Lin et al., "LycheeDecode: Accelerating Long-Context LLM Inference via Hybrid-Head Sparse
Decoding", ICLR 2026, arXiv:2602.04541; it refines the layer-level sharing of TidalDecode
(Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse
Attention", arXiv:2410.05076: a few token-selection layers run full attention, choose the top-k
tokens, and the layers after them reuse that choice) to the head level: the top-k sets of a
head are largely shared with the same head of the adjacent layer, so most heads (*sparse
heads*) reuse the critical tokens of that head in the previous layer, and a few (*retrieval
heads*) run full attention and choose the critical tokens afresh.

What kvlab does at each decoding step, in each layer, per KV head (its query heads share):

- a retrieval head attends to the whole cache and chooses the ``max(1, budget // block)``
  blocks of ``block`` entries with the most attention probability (summed over its query
  heads); the choice is passed to the same KV head of the next layer;
- a sparse head attends exactly to the blocks its KV head inherited from the previous layer,
  and passes them on unchanged;
- every head of layer 0 is a retrieval head (nothing to inherit), as TidalDecode's first
  selection layer.

Different from the paper: **the head split is training-free.** The paper learns it with
HardKuma gates; kvlab calibrates it (the paper's training-free variant as kvlab's issue names
it): ``probes`` prompts of ``probe_length`` tokens (``calibration="prose"``: kvlab's prose
corpus, random tokens without a tokenizer; ``"random"``: random tokens) are prefilled, and for
each KV head of every layer after the first the *recall of reuse* is measured: the attention
probability the last ``queries`` queries put on the top-``budget`` blocks the same KV head
chose in the previous layer (blocks and budget as in decoding, a budget fraction taken of the
probe length), averaged over the queries, the KV head's query heads and the probes. The
``retrieval`` share of those heads with the lowest recall become retrieval heads. The scores
are cached in memory and on disk as DuoAttention's are
(:func:`kvlab.compress.duo_heads.cached_head_scores`); recall is measured between adjacent
layers only, while a sparse head may inherit through several sparse layers.

Cost: a retrieval head reads its KV head's whole cache once (its logits, whose softmax both
weighs the values and chooses the blocks); the sparse heads of a layer read only their
``count`` blocks each, gathered together as runs of ``block`` entries (one gather per keys and
values). No side index is stored (the choice lives in the forward's scratch), so
the cache's bytes are those of ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from kvlab.compress.base import CompressMethod
from kvlab.compress.duo_heads import cached_head_scores, kv_heads_of
from kvlab.engine.context import LayerContext
from kvlab.engine.kernels import gather_entries
from kvlab.registry import Budget, param, register, resolve_budget
from kvlab.retrieve.base import RetrieveMethod

SCRATCH_KEY = "lychee.blocks"


@dataclass(frozen=True)
class Calibration:
    """The settings the recall scores depend on (the cache key)."""

    budget: Budget
    block: int
    queries: int
    probes: int
    length: int
    calibration: str


def block_mass(probs: Tensor, block: int) -> Tensor:
    """Attention probability per block ``[..., ceil(n / block)]`` of ``probs`` ``[..., n]``."""
    n = probs.shape[-1]
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(probs, (0, blocks * block - n))
    return padded.reshape(*probs.shape[:-1], blocks, block).sum(dim=-1)


def kv_head_probs(logits: Tensor, kv_heads: int) -> Tensor:
    """Softmax of fp32 ``logits`` ``[b, Hq, t, n]`` summed over each KV head's query heads,
    divided by the group size: ``[b, kv_heads, t, n]``."""
    probs = torch.softmax(logits, dim=-1)
    b, hq, t, n = probs.shape
    return probs.reshape(b, kv_heads, hq // kv_heads, t, n).mean(dim=2)


@register
@dataclass(frozen=True)
class Lychee(RetrieveMethod):
    name: ClassVar[str] = "lychee"
    paper: ClassVar[str] = "Lin et al., LycheeDecode, ICLR 2026, arXiv:2602.04541 (TidalDecode, arXiv:2410.05076)"
    sliding_window_refusal: ClassVar[str | None] = (
        "its sparse heads reuse the blocks the layer before chose and its calibration scores "
        "every layer, and a sliding-window layer chooses no blocks; use quest or shadowkv (each "
        "global layer selects for itself)"
    )
    summary: ClassVar[str] = (
        "Calibrated retrieval heads choose the top-k blocks by full attention; the other heads "
        "reuse their KV head's blocks from the previous layer."
    )

    budget: Budget = param(1024, "entries a sparse head reads per step (blocks x block size)")
    block: int = param(16, "entries per block", min=1, max=1024)
    retrieval: float = param(
        0.25, "share of the KV heads after layer 0 that are retrieval heads", min=0.0, max=1.0
    )
    calibration: Literal["prose", "random"] = param(
        "prose", "calibration prompts: kvlab's prose corpus (random tokens without a tokenizer) or random tokens"
    )
    probes: int = param(2, "calibration prompts", min=1)
    probe_length: int = param(1024, "tokens of each calibration prompt (capped at the trained length)", min=16)
    queries: int = param(16, "last queries of each calibration prompt whose recall is measured", min=1)

    def blocks(self, n: int) -> int:
        return max(1, resolve_budget(self.budget, n) // self.block)

    # -- once per model --------------------------------------------------------------------
    def settings(self, engine: Any) -> Calibration:
        length = min(self.probe_length, engine.trained_length)
        return Calibration(self.budget, self.block, min(self.queries, length), self.probes, length, self.calibration)

    def prepare(self, engine: Any) -> tuple[tuple[bool, ...], ...]:
        """The head split ``[layer][kv_head]`` (True: retrieval head), from calibrated recalls."""
        layers, kv_heads = engine.config.num_hidden_layers, kv_heads_of(engine.config)
        if self.retrieval in (0.0, 1.0) or layers == 1:
            rest = self.retrieval == 1.0
            return ((True,) * kv_heads,) + ((rest,) * kv_heads,) * (layers - 1)
        recall = cached_head_scores(engine, self.settings(engine), "lychee", measure_recall)
        later = recall[1:].flatten()
        count = round(self.retrieval * later.numel())
        chosen = torch.zeros(later.numel(), dtype=torch.bool)
        chosen[torch.argsort(later, stable=True)[:count]] = True
        return ((True,) * kv_heads,) + tuple(tuple(row) for row in chosen.reshape(layers - 1, kv_heads).tolist())

    # -- per step --------------------------------------------------------------------------
    def attend(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        """One decoding step of a layer: the retrieval heads (each a view of its KV head's
        entries) attend over everything and choose afresh; the sparse heads, all at once (one
        gather of their blocks per keys and values), attend over the blocks they inherit."""
        layer = ctx.layer
        n, kv_heads = layer.num_entries, layer.kv_heads
        count = self.blocks(n)
        if count * self.block >= n:
            return None
        split = ctx.prepared.get("retrieve")
        if split is None:
            raise RuntimeError("lychee runs in a sequence made by Engine.new_sequence (no head split)")
        inherited = ctx.scratch.get(SCRATCH_KEY)  # [b, kv_heads, count] or None (layer 0)
        retrieval, sparse = head_sets(split[ctx.index] if inherited is not None else (True,) * kv_heads, q.device)
        b, hq, _, d = q.shape
        group = hq // kv_heads
        if not retrieval:  # every head reuses: the whole layer at once, no copies
            ctx.scratch[SCRATCH_KEY] = inherited
            return self.reuse(q, ctx, slice(None), inherited)
        if len(retrieval) == kv_heads:
            out, chosen = self.retrieve(q, ctx, slice(None), count)
            ctx.scratch[SCRATCH_KEY] = chosen
            return out
        out = torch.empty_like(q)
        by_kv_head = out.view(b, kv_heads, group, 1, d)
        chosen = inherited.clone()
        for head in retrieval:  # a few heads, each a slice of the layer (never a copy of it)
            heads = slice(head, head + 1)
            by_kv_head[:, heads], chosen[:, heads] = self.retrieve(
                q[:, head * group : (head + 1) * group], ctx, heads, count)
        q_sparse = q.view(b, kv_heads, group, 1, d)[:, sparse].reshape(b, -1, 1, d)
        by_kv_head[:, sparse] = self.reuse(q_sparse, ctx, sparse, inherited[:, sparse]).view(b, -1, group, 1, d)
        ctx.scratch[SCRATCH_KEY] = chosen
        return out

    def retrieve(self, q: Tensor, ctx: LayerContext, heads: slice, count: int) -> tuple[Tensor, Tensor]:
        """Retrieval heads: attention ``[b, g * h, 1, d]`` of their query heads ``q`` over the
        whole cache of the KV heads ``heads`` (``h`` of them, a slice), and each KV head's
        ``count`` blocks ``[b, h, count]`` of most probability. The cache is read once: the
        probabilities that choose the blocks are those the output is made of."""
        layer = ctx.layer
        keys, values = layer.keys[:, heads], layer.values[:, heads]
        k_pos = layer.key_positions()
        if k_pos.dim() == 3:
            k_pos = k_pos[:, heads]
        probs = kv_head_group_probs(ctx.position.logits(q, ctx.positions, keys, k_pos, ctx.rotary, ctx.scaling),
                                    keys.shape[1])  # [b, h, g, n] fp32
        out = torch.matmul(probs.to(values.dtype), values)  # [b, h, g, d]
        blocks = block_mass(probs.mean(dim=2), self.block).topk(count, dim=-1).indices
        return out.reshape(q.shape).to(q.dtype), blocks

    def reuse(self, q: Tensor, ctx: LayerContext, heads: int | slice | Tensor, blocks: Tensor) -> Tensor:
        """Sparse heads: attention ``[b, g * h, 1, d]`` of the query heads ``q`` of the KV heads
        ``heads`` (an index, a slice or int64 indices; ``h`` of them) over their blocks
        ``[b, h, count]`` only, gathered as runs of ``block`` entries in one gather (the partial
        last block's run starts early and its entries before the block do not count)."""
        layer = ctx.layer
        n = layer.num_entries
        if isinstance(heads, int):
            heads = slice(heads, heads + 1)
        firsts = blocks * self.block
        starts = firsts.clamp(max=n - self.block)
        if isinstance(heads, slice):
            keys = gather_entries(layer.keys[:, heads], starts, self.block)
            values = gather_entries(layer.values[:, heads], starts, self.block)
        else:
            keys = gather_entries(layer.keys, starts, self.block, heads=heads)
            values = gather_entries(layer.values, starts, self.block, heads=heads)
        entries = (starts[..., None] + torch.arange(self.block, device=q.device)).flatten(-2)
        valid = entries >= firsts.repeat_interleave(self.block, dim=-1)  # [b, h, count * block]
        k_pos = layer.entry_positions(entries, heads)
        return ctx.attend(q, ctx.positions, keys, k_pos, values, valid[:, :, None, :])


def kv_head_group_probs(logits: Tensor, kv_heads: int) -> Tensor:
    """Softmax ``[b, kv_heads, g, n]`` of one decoding step's fp32 ``logits`` ``[b, Hq, 1, n]``,
    the rows of each KV head's ``g`` query heads together."""
    b, hq, _, n = logits.shape
    return torch.softmax(logits.view(b, kv_heads, hq // kv_heads, n), dim=-1)


_HEAD_SETS: dict[tuple[tuple[bool, ...], torch.device], tuple[list[int], Tensor]] = {}


def head_sets(split: tuple[bool, ...], device: torch.device) -> tuple[list[int], Tensor]:
    """The retrieval KV heads of a layer's split (a list) and its sparse ones (int64 indices),
    made once per split and device."""
    key = (split, device)
    sets = _HEAD_SETS.get(key)
    if sets is None:
        sets = _HEAD_SETS[key] = (
            [h for h, r in enumerate(split) if r],
            torch.tensor([h for h, r in enumerate(split) if not r], dtype=torch.long, device=device),
        )
    return sets


def measure_recall(engine: Any, settings: Calibration) -> Tensor:
    """Recall of reuse ``[layers, kv_heads]`` (layer 0: 1, it never reuses): the mean over
    calibration prompts of :class:`ReuseRecall`."""
    from kvlab.recipe import Recipe

    total = torch.zeros(engine.config.num_hidden_layers, kv_heads_of(engine.config))
    for ids in calibration_prompts(engine, settings):
        sequence = engine.probe(Recipe(compress=ReuseRecall(settings)), ids)
        blocks = sequence.prepared["compress"]
        total[0] += 1.0
        for index in range(1, len(blocks)):
            mass, previous = blocks[index][0], blocks[index - 1][1]
            total[index] += mass.gather(-1, previous).sum(-1).mean(dim=(0, 2))
    return total / settings.probes


def calibration_prompts(engine: Any, settings: Calibration) -> list[list[int]]:
    """``probes`` prompts of ``length`` tokens: prose (with a tokenizer) or random tokens."""
    prompts = []
    for k in range(settings.probes):
        if settings.calibration == "prose" and engine.format is not None:
            from kvlab.corpus import haystack_units

            ids: list[int] = []
            offset = 7_919 * k
            while len(ids) < settings.length:
                ids += engine.format.encode("".join(haystack_units("prose", settings.length, offset)), first=not ids)
                offset += settings.length
            prompts.append(ids[: settings.length])
        else:
            g = torch.Generator().manual_seed(10_000 + k)
            prompts.append(torch.randint(0, engine.config.vocab_size, (settings.length,), generator=g).tolist())
    return prompts


@dataclass(frozen=True)
class ReuseRecall(CompressMethod):
    """Calibration probe (not registered): at the end of a prompt's prefill, records per layer
    the block attention mass ``[b, kv_heads, queries, blocks]`` of the last ``queries`` queries
    and their top-``budget`` blocks. Keeps every entry (the cache is thrown away)."""

    name: ClassVar[str] = "lychee.probe"
    paper: ClassVar[str] = "-"
    summary: ClassVar[str] = "LycheeDecode's head calibration probe."

    settings: Calibration

    def prepare(self, engine: Any) -> list[Any]:
        return [None] * engine.config.num_hidden_layers

    def keep(self, q: Tensor, ctx: LayerContext) -> None:
        return None

    def compress(self, q: Tensor, ctx: LayerContext) -> None:
        s = self.settings
        q_pos = ctx.positions[-s.queries :]
        logits = ctx.logits(q[:, :, -s.queries :], q_pos)
        mass = block_mass(kv_head_probs(logits, ctx.layer.kv_heads), s.block)
        count = max(1, resolve_budget(s.budget, ctx.layer.num_entries) // s.block)
        ctx.prepared["compress"][ctx.index] = (mass.cpu(), mass.topk(min(count, mass.shape[-1]), dim=-1).indices.cpu())
