"""DuoAttention: retrieval heads keep the whole cache, streaming heads only sinks and recent tokens.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads", ICLR 2025, arXiv:2410.10819. Only some KV heads need the whole context (*retrieval
heads*); the others (*streaming heads*) attend to the first ``sink`` tokens and the last
``recent`` ones, as StreamingLLM does for every head. Each KV head therefore keeps its own
number of entries: kvlab stores the layers ragged (:mod:`kvlab.engine.ragged`), so the memory
of streaming heads is really freed and attention runs over exactly what each head keeps.

Faithful to the paper:

- the split is global: ``retrieval`` is the share of *all* KV heads of the model (every layer
  together) that are retrieval heads, 50% by default (the paper's GQA setting);
- streaming heads keep 128 sinks + 256 recent entries (the paper's values), retrieval heads
  everything; decoded tokens are appended to every head, and streaming heads drop their oldest
  non-sink entries as they go, so their memory stays constant while retrieval heads grow.

Different from the paper:

- **Identification is training-free.** The paper learns one gate per KV head by optimising a
  mix of full and streaming attention on synthetic data (passkeys inserted in long text),
  which needs training. kvlab runs ``probes`` synthetic prompts of the families named by
  ``probe_set`` (:mod:`kvlab.compress.duo_probes`: ``passkey`` digits, ``words`` a word-valued
  fact, ``multikey`` one of four keyed passkeys, ``multihop`` a two-step fact; the default
  mixes all four, cycling through them), each with its needles at a fixed depth of prose
  filler, the question at the end and the answer fed as the last tokens, and scores each KV
  head by the attention probability that the *answer* queries (those predicting the answer's
  tokens) put on the entries that matter, averaged over the query heads of the KV head, the
  answer queries and the probes; the heads with the highest scores are the retrieval heads.
  ``score`` chooses the entries: ``needle`` (default), the tokens of the needles the answer
  needs (never a distractor; the retrieval-head score of Wu et al., arXiv:2404.15574, in
  attention-mass form); ``far``, every entry a streaming head would not keep (after the sinks,
  before the recent window). Needles always lie outside the streaming window of the answer
  queries. Without a tokenizer (tiny random test models) the filler is random tokens and each
  family a random-token analogue (the passkey: 8 random tokens repeated at the end).
  Measured on SmolLM2-135M-Instruct (10 passkey prompts of ~1k tokens, needle at 20-60% depth,
  default sink/recent, heads found on 4 passkey probes): full attention finds 8/10 keys;
  ``needle`` finds 7/10 at ``retrieval=0.5`` (6/10 at 0.25); ``far`` finds 2/10 at 0.5 (7/10
  at 0.75): ``far`` mostly picks diffuse heads of the first layers, whose mass spreads far
  without retrieving anything. A user measured heads found on passkeys alone keeping 0.67x
  of full's accuracy on a digit-code task but 0.2x on a names -> cities task; the mix is the
  default so that the heads are also found on word answers, distractors and two-step facts.
  ``benchmarks/duo_generalise.py`` measures held-out families (12 questions each, 0.29x of
  full's bytes): heads from the mix keep 0.75x of full on digits, 0.86x on names -> cities,
  1.00x on multikey; passkey-only heads answer 6/12 names -> cities against full's 7/12, so
  the drop to 0.2x was not reproduced (benchmarks/README.md, "duo_generalise.py").
- **Prefill attention stays dense**: every head attends to the whole prompt while it is
  encoded; streaming heads shrink the cache once the prefill ends (the paper also makes the
  prefill of streaming heads sparse). A question appended to a session is also encoded densely;
  streaming heads evict down to their window at the first decoding step after it.
- **Eviction in blocks**: a streaming head evicts once it holds ``evict_every`` entries beyond
  ``sink + recent`` (16 by default), so it attends to at most ``evict_every - 1`` more recent
  tokens than the paper's window, and the copy of its entries happens once every
  ``evict_every`` steps instead of every step. ``evict_every=1`` gives the exact window.
- **Decoding cost**: a layer with both kinds of heads runs attention head by head (one kernel
  call per KV head); a layer whose heads are all streaming (or all retrieval) stays rectangular.
  The paper fuses both kinds in one kernel.

Cost of the identification: ``probes`` prefills of ``probe_length`` tokens, once per model and
setting (SmolLM2-135M, defaults: 8 x 1024 tokens, ~20-60 s on 2 CPU cores); the engine's work
counters do not count it. The per-head scores are kept in memory for the process and in
``<kvlab cache dir>/duo_attention/<model>-<key>.json`` (a few KB: one float per KV head, and the
settings), keyed by the model's name and configuration, a fingerprint of its weights and dtype,
and the identification settings, the probe set included (the fingerprint is taken once per model object: weights
changed in place afterwards are not noticed). The split is derived from the stored scores for any
``retrieval`` share, so changing the share does not identify again. ``retrieval`` 0 or 1
needs no identification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from kvlab.compress.base import CompressMethod, Keep, apply_keep, sinks_and_recent
from kvlab.engine.context import LayerContext
from kvlab.errors import RecipeError
from kvlab.registry import param, register

from kvlab.compress.duo_heads import (
    PROBE_ROOM, Identification, head_scores, kv_heads_of, retrieval_heads,
)
from kvlab.compress.duo_probes import DEFAULT_PROBE_SET, PROBE_FAMILIES, parse_probe_set

@dataclass(frozen=True)
class HeadSplit:
    """Which KV heads are retrieval heads: ``retrieval[layer][head]``. ``scores``
    ``[layers, kv_heads]`` are the identification scores (None for a share of 0 or 1)."""

    retrieval: tuple[tuple[bool, ...], ...]
    scores: Tensor | None = None


@register
@dataclass(frozen=True)
class DuoAttention(CompressMethod):
    name: ClassVar[str] = "duo_attention"
    paper: ClassVar[str] = "Xiao et al., DuoAttention, ICLR 2025, arXiv:2410.10819"
    sliding_window_refusal: ClassVar[str | None] = (
        "its head identification scores the heads of every layer over the whole context, and a "
        "sliding-window layer's heads see only their window (streaming heads by construction); "
        "use a compress method that scores each global layer, e.g. snapkv"
    )
    summary: ClassVar[str] = (
        "Retrieval heads keep the whole cache, streaming heads sinks + recent (training-free "
        "head identification)."
    )
    ragged_heads: ClassVar[bool] = True

    retrieval: float = param(
        0.5, "share of all KV heads of the model kept whole as retrieval heads (paper: 50%)",
        min=0.0, max=1.0,
    )
    sink: int = param(128, "first entries a streaming head keeps (paper: 128 attention sinks)", min=0)
    recent: int = param(256, "last entries a streaming head keeps (paper: 256)", min=1)
    evict_every: int = param(
        16, "a streaming head evicts once it holds this many entries beyond sink + recent "
        "(1: exactly sink + recent after every decoding step)", min=1,
    )
    score: Literal["needle", "far"] = param(
        "needle", "identification: attention of the answer queries on the needle, or on every "
        "entry a streaming head drops (far)",
    )
    probes: int = param(8, "synthetic prompts used to identify the heads (cycling through "
                        "the families of probe_set)", min=1)
    probe_set: str = param(
        DEFAULT_PROBE_SET, "comma-separated probe families the heads are identified on: "
        f"{', '.join(PROBE_FAMILIES)} (default: the mix of all four)",
    )
    probe_length: int = param(
        1024, "tokens of each identification prompt (capped at the model's trained length)",
        min=PROBE_ROOM,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "probe_set", ",".join(parse_probe_set(self.probe_set)))
        if self.needs_identification and self.probe_length < self.sink + self.recent + PROBE_ROOM:
            raise RecipeError(
                f"duo_attention(probe_length={self.probe_length}): identification prompts need "
                f"at least sink + recent + {PROBE_ROOM} = {self.sink + self.recent + PROBE_ROOM} "
                "tokens (the needle must lie outside the streaming window)"
            )

    @property
    def needs_identification(self) -> bool:
        return 0.0 < self.retrieval < 1.0

    # -- once per model ------------------------------------------------------------------------
    def identification(self, engine: Any) -> Identification:
        length = min(self.probe_length, engine.trained_length)
        if length < self.sink + self.recent + PROBE_ROOM:
            raise RecipeError(
                f"duo_attention(probe_length={self.probe_length}) is capped at the model's trained "
                f"length {engine.trained_length}, which leaves no room beyond sink + recent = "
                f"{self.sink + self.recent}; lower sink or recent"
            )
        return Identification(self.sink, self.recent, self.probes, length, self.score, self.probe_set)

    def prepare(self, engine: Any) -> HeadSplit:
        """Identify the retrieval heads (cached on disk and in memory, see the module docstring)."""
        layers, kv_heads = engine.config.num_hidden_layers, kv_heads_of(engine.config)
        if not self.needs_identification:
            every = self.retrieval == 1.0
            return HeadSplit(tuple((every,) * kv_heads for _ in range(layers)))
        scores = head_scores(engine, self.identification(engine))
        chosen = retrieval_heads(scores, self.retrieval)
        return HeadSplit(tuple(tuple(row) for row in chosen.tolist()), scores)

    # -- per layer -------------------------------------------------------------------------------
    def keep(self, q: Tensor, ctx: LayerContext) -> Keep:
        """At the end of the prefill, streaming heads keep ``sink`` first + ``recent`` last entries."""
        return self._streaming_keep(ctx, over=1)

    @property
    def evicts_while_decoding(self) -> bool:
        return self.retrieval < 1.0

    def after_decode_step(self, q: Tensor, ctx: LayerContext) -> None:
        """Streaming heads holding ``evict_every`` entries beyond ``sink + recent`` drop their
        oldest non-sink entries; retrieval heads keep growing."""
        apply_keep(ctx.layer, self._streaming_keep(ctx, over=self.evict_every))

    def _streaming_keep(self, ctx: LayerContext, over: int) -> Keep:
        """Shrink every streaming head of the layer holding ``>= sink + recent + over`` entries."""
        split = ctx.prepared.get("compress")
        if not isinstance(split, HeadSplit):
            raise RuntimeError("duo_attention runs in a sequence made by Engine.new_sequence (no head split)")
        layer, window = ctx.layer, self.sink + self.recent
        keep: list[Tensor | None] = []
        for retrieval, n in zip(split.retrieval[ctx.index], layer.head_entries()):
            if retrieval or n < window + over:
                keep.append(None)
            else:
                keep.append(sinks_and_recent(n, self.sink, self.recent, ctx.positions.device))
        if all(rows is None for rows in keep):
            return None
        if not layer.is_ragged and all(rows is not None for rows in keep):
            return keep[0]  # every head streaming: the layer stays rectangular
        return keep
