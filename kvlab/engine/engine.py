"""The engine: prefill, compress, decode — one recipe at a time, on one loaded model.

The hot loop is visible here: :meth:`Engine.prefill` runs the prompt through the model in
chunks (compressing at the end), :meth:`Engine.decode` samples one token per forward.
Token-selective prefill methods (kvlab.prefill) get two seams: the context to prefill may be
chosen first (:meth:`PrefillMethod.select_tokens`, given :meth:`Engine.probe_layer`), and a
layer may ask that only some tokens run through the later layers: a forward pre-hook on every
decoder layer (:func:`_propagate_rows`) slices the hidden states there. The hook is the one
place the residual stream is reachable (kvlab's attention function sees only q, k, v). Every
forward goes through kvlab's attention function, with one
:class:`~kvlab.engine.forward.ForwardContext`, on a :class:`~kvlab.engine.sequence.Sequence`
made for the recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from kvlab.engine.attention import ATTENTION_NAME, FORWARD_KWARG
from kvlab.engine.cache import LayerKV
from kvlab.engine.context import PROPAGATED_ROWS, LayerContext
from kvlab.engine.forward import ForwardContext, Phase, StopForward
from kvlab.engine.progress import progress_bar
from kvlab.engine.prompt import PromptFormat
from kvlab.engine.ragged import RaggedLayerKV
from kvlab.engine.rotary import DeferredRotary, head_dim
from kvlab.engine.sampling import Sampling, TokenSampler
from kvlab.engine.sequence import KVCache, Sequence
from kvlab.errors import InputError, ModelError
from kvlab.position.base import TRAINED_ROPE
from kvlab.recipe import Recipe, parse_recipe
from kvlab.engine.results import (
    Answer, Counters, Decoded, Stats, check_max_new_tokens, check_text,
)
from kvlab.reuse.session import Session

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_architecture(config: Any) -> None:
    """Refuse models whose attention kvlab would compute differently from the model."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (sliding-window models such as gemma3 are not "
            "handled yet)"
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [t for t in layer_types if t != "full_attention"]
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if sliding or (window is not None and window < config.max_position_embeddings):
        raise ModelError(
            f"this {model_type} model uses sliding-window attention (sliding_window={window}, "
            f"layer types {sorted(set(layer_types)) or 'n/a'}); kvlab does not support "
            "sliding-window layers yet"
        )


class Engine:
    """A loaded model and tokenizer, ready to run recipes (see :func:`kvlab.load`).

    The hot loop is :meth:`prefill` then :meth:`decode`, on a :class:`Sequence` made by
    :meth:`new_sequence`; :meth:`generate` and :meth:`session` are the public entry points.
    """

    def __init__(
        self, model: Any, tokenizer: Any = None, name: str = "model", progress: bool = True,
        prefill_chunk: int = 1024,
    ) -> None:
        check_architecture(model.config)
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.name = name
        self.progress = progress
        self.prefill_chunk = prefill_chunk
        self.format = PromptFormat(tokenizer) if tokenizer is not None else None
        self.device = next(model.parameters()).device
        self.trained_length = int(self.config.max_position_embeddings)
        self.counters = Counters()
        self.stop_ids = self._stop_ids()
        model.set_attn_implementation(ATTENTION_NAME)
        model.get_decoder().rotary_emb = DeferredRotary(head_dim(self.config))
        for layer in model.get_decoder().layers:
            layer.register_forward_pre_hook(_propagate_rows, with_kwargs=True)

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return ids

    @property
    def prompt_format(self) -> PromptFormat:
        """The tokenizer's prompt format (chat template); a :class:`ModelError` without one."""
        if self.format is None:
            raise ModelError("this engine has no tokenizer; use generate_ids with token ids")
        return self.format

    # -- a sequence and one forward ---------------------------------------------------------
    def new_sequence(self, recipe: Recipe | str | None) -> Sequence:
        """An empty sequence for ``recipe``: storage in the recipe's format, and what its
        methods prepare once per model (:meth:`Method.prepare`)."""
        parsed = parse_recipe(recipe)
        if parsed.quantize is not None:
            new_layer = parsed.quantize.new_layer
        elif parsed.compress is not None and parsed.compress.ragged_heads:
            new_layer = RaggedLayerKV
        else:
            new_layer = LayerKV
        prepared: dict[str, Any] = {}
        for method in parsed.methods:
            state = method.prepare(self)
            if state is not None:
                prepared[method.stage] = state
        return Sequence(parsed, KVCache(self.config.num_hidden_layers, new_layer), prepared)

    def context_window(self, recipe: Recipe) -> int:
        return (recipe.position or TRAINED_ROPE).context_window(self.trained_length)

    @torch.inference_mode()
    def forward(
        self, sequence: Sequence, ids: list[int], phase: Phase, stop_after: int | None = None,
        counts: list[int] | None = None, pairs: list[int] | None = None,
    ) -> Tensor:
        """Run ``ids`` through the model on top of ``sequence``; next-token logits ``[vocab]``.
        With ``stop_after``, the forward ends in that layer's attention (:class:`StopForward`).
        ``counts`` and ``pairs`` (default: the sequence's) tally the tokens each layer ran and
        the query-key pairs its attention computed."""
        return self._run(sequence, ids, phase, stop_after, counts, pairs, keep=1)[-1]

    @torch.inference_mode()
    def forward_logits(self, sequence: Sequence, ids: list[int], phase: Phase) -> Tensor:
        """Run ``ids`` through the model on top of ``sequence``; the logits ``[len(ids), vocab]``
        after every one of them (row ``i`` predicts the token after ``ids[i]``). Teacher
        forcing over a chunk: memory grows with the chunk, never with the sequence."""
        return self._run(sequence, ids, phase, None, None, None, keep=0)

    def _run(
        self, sequence: Sequence, ids: list[int], phase: Phase, stop_after: int | None,
        counts: list[int] | None, pairs: list[int] | None, keep: int,
    ) -> Tensor:
        """One model forward; the float logits ``[t, vocab]`` of the last ``keep`` tokens
        (``keep=0``: all of them)."""
        start = sequence.seen
        positions = torch.arange(start, start + len(ids), device=self.device)
        forward = ForwardContext(
            recipe=sequence.recipe,
            cache=sequence.cache,
            positions=positions,
            rotary=sequence.rotary(self.config, start + len(ids), self.trained_length),
            phase=phase,
            prepared=sequence.prepared,
            stop_after=stop_after,
            counts=sequence.layer_tokens if counts is None else counts,
            pairs=sequence.layer_pairs if pairs is None else pairs,
        )
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=positions[None],
            cache=sequence.cache,
            use_cache=True,
            logits_to_keep=keep,
            **{FORWARD_KWARG: forward},
        )
        self.counters.forwards += 1
        return out.logits[0].float()

    # -- prefill and decode -----------------------------------------------------------------
    def chunks(self, total: int, size: int | None = None) -> list[tuple[int, int]]:
        """Prefill chunk boundaries (chunks of ``size`` tokens, default the engine's
        ``prefill_chunk``); a short tail joins the previous chunk so the last chunk holds at
        least half a chunk (compression's observation window lives there)."""
        size = size or self.prefill_chunk
        bounds = [(s, min(s + size, total)) for s in range(0, total, size)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < size // 2:
            (a, _), (_, e) = bounds[-2], bounds[-1]
            bounds[-2:] = [(a, e)]
        return bounds

    def prefill(
        self, sequence: Sequence, ids: list[int], *, compress: bool, progress: bool | None = None
    ) -> Tensor:
        """Encode ``ids`` into ``sequence`` chunk by chunk. With ``compress``, ``ids`` are the
        context: the compress method observes every chunk and compresses after the last one;
        without, they are appended to the cache as they are. ``progress`` (default: the
        engine's setting) shows a progress bar for long prompts."""
        if not ids:
            raise InputError("nothing to prefill: the prompt encodes to zero tokens")
        sequence.layer_tokens[:] = [0] * len(sequence.layer_tokens)
        sequence.layer_pairs[:] = [0] * len(sequence.layer_pairs)
        method = sequence.recipe.prefill
        if compress and method is not None:
            context = ids
            ids = method.select_tokens(
                context, lambda layer: self.probe_layer(sequence, context, layer),
                self.config.num_hidden_layers,
            )
        whole = compress and method is not None and method.whole_context
        bounds = [(0, len(ids))] if whole else self.chunks(len(ids))
        show = (self.progress if progress is None else progress) and len(bounds) > 2
        with progress_bar(show) as bar:
            task = bar.add_task(f"prefill {len(ids)} tokens", total=len(ids))
            for i, (a, b) in enumerate(bounds):
                if not compress:
                    phase = Phase.APPEND
                else:
                    phase = Phase.CONTEXT_END if i == len(bounds) - 1 else Phase.CONTEXT
                logits = self.forward(sequence, ids[a:b], phase)
                bar.update(task, advance=b - a)
        self.counters.prefilled_tokens += len(ids)
        return logits

    def probe_layer(self, sequence: Sequence, ids: list[int], layer: int) -> tuple[Tensor, LayerContext]:
        """Run ``ids`` chunk by chunk through layers ``0..layer`` only, on a scratch cache
        beside ``sequence`` (same recipe, plain storage, nothing compressed); returns layer
        ``layer``'s unrotated queries of the last chunk and its :class:`LayerContext`. The
        tokens run and pairs computed are added to ``sequence.layer_tokens`` / ``layer_pairs``."""
        scratch = Sequence(sequence.recipe, KVCache(self.config.num_hidden_layers), sequence.prepared)
        for a, b in self.chunks(len(ids)):
            try:
                self.forward(scratch, ids[a:b], Phase.APPEND, stop_after=layer, counts=sequence.layer_tokens,
                             pairs=sequence.layer_pairs)
            except StopForward as stop:
                query, ctx = stop.query, stop.ctx
        return query, ctx

    def probe(self, recipe: Recipe, ids: list[int]) -> Sequence:
        """Prefill ``ids`` as a context with ``recipe`` as set-up work (a method measuring the
        model in :meth:`Method.prepare`, e.g. DuoAttention's head identification): no progress
        display, and not counted in :attr:`counters`, which count the work of requests."""
        sequence = self.new_sequence(recipe)
        counters = replace(self.counters)
        try:
            self.prefill(sequence, ids, compress=True, progress=False)
        finally:
            self.counters = counters
        return sequence

    def decode(
        self, sequence: Sequence, logits: Tensor, max_new_tokens: int, sampler: TokenSampler,
        keep_logprobs: bool = False, on_token: Callable[[int], bool] | None = None,
    ) -> Decoded:
        """Generate up to ``max_new_tokens``; stops after a stop token. The last token is not
        run through the model (it is returned, not cached). ``on_token`` is called with each
        token as soon as it is drawn; returning False stops the generation there (a server
        streams tokens this way, and cancels a request whose client left)."""
        result = Decoded()
        start = time.perf_counter()
        for i in range(max_new_tokens):
            if keep_logprobs:
                result.logprobs.append(torch.log_softmax(logits, dim=-1))
            token = sampler(logits)
            result.tokens.append(token)
            go_on = on_token is None or on_token(token)
            if token in self.stop_ids or i == max_new_tokens - 1 or not go_on:
                break
            logits = self.forward(sequence, [token], Phase.DECODE)
        result.seconds = time.perf_counter() - start
        self.counters.decoded_tokens += len(result.tokens)
        return result

    def teacher_force(self, sequence: Sequence, logits: Tensor, tokens: list[int]) -> Tensor:
        """Log-probabilities ``[len(tokens), vocab]`` the model gives each of ``tokens`` when
        they are fed one by one after ``logits`` (the state the prefill left)."""
        rows = [torch.log_softmax(logits, dim=-1)]
        for token in tokens[:-1]:
            rows.append(torch.log_softmax(self.forward(sequence, [token], Phase.DECODE), dim=-1))
        return torch.stack(rows)

    # -- checks -------------------------------------------------------------------------------
    def check_fits(
        self, recipe: Recipe, prompt_tokens: int, max_new_tokens: int, allow_overflow: bool
    ) -> None:
        """Refuse a prompt of ``prompt_tokens`` that, with ``max_new_tokens`` to generate, does
        not fit the window of the recipe's position method (``max_new_tokens=0``: a context
        that later questions will extend)."""
        check_max_new_tokens(max_new_tokens, allow_zero=True)
        window = self.context_window(recipe)
        total = prompt_tokens + max_new_tokens
        if total <= window or allow_overflow:
            return
        if max_new_tokens:
            what = f"{prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} = {total} tokens"
        else:
            what = f"the context's {prompt_tokens} tokens"
        raise InputError(
            f"{what} exceed the {window}-token window of {self.name} with recipe '{recipe}'; "
            f"{self._extension_hint(total)}, or allow the overflow (allow_overflow=True, "
            "--allow-overflow) to watch the model fail"
        )

    def _extension_hint(self, total: int) -> str:
        """A position method whose window holds ``total`` tokens, within its parameter range."""
        from kvlab.registry import method_class

        needed = 2 ** math.ceil(math.log2(total / self.trained_length))
        yarn_max = int(_param_max(method_class("yarn"), "factor"))
        group_max = int(_param_max(method_class("self_extend"), "group_size"))
        hints = []
        if needed <= yarn_max:
            hints.append(f"'yarn(factor={needed})'")
        if max(2, needed) <= group_max:
            hints.append(f"'self_extend(group_size={max(2, needed)})'")
        if not hints:
            return (
                f"no position method reaches {total} tokens on this model (yarn's factor is at "
                f"most {yarn_max}: {yarn_max * self.trained_length} tokens); shorten the prompt"
            )
        return "add a position method, e.g. " + " or ".join(hints)

    # -- public API --------------------------------------------------------------------------
    def generate_ids(
        self, ids: list[int], recipe: Recipe | str | None = None, max_new_tokens: int = 64,
        sampling: Sampling | None = None, allow_overflow: bool = False,
    ) -> Answer:
        """Generate from token ids (the prompt is prefilled and compressed as one)."""
        check_max_new_tokens(max_new_tokens)
        if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise InputError(f"ids: must be a list of token ids (integers), got {type(ids).__name__}")
        sequence = self.new_sequence(parse_recipe(recipe))
        self.check_fits(sequence.recipe, len(ids), max_new_tokens, allow_overflow)
        start = time.perf_counter()
        logits = self.prefill(sequence, list(ids), compress=True)
        prefill_s = time.perf_counter() - start
        decoded = self.decode(sequence, logits, max_new_tokens, (sampling or Sampling()).sampler(self.device))
        return Answer(
            text=self.tokenizer.decode(decoded.tokens, skip_special_tokens=True) if self.tokenizer else "",
            token_ids=decoded.tokens,
            stats=Stats.measure(sequence, len(ids), len(ids), prefill_s, decoded),
        )

    def generate(
        self, prompt: str, recipe: Recipe | str | None = None, max_new_tokens: int = 64,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
        allow_overflow: bool = False,
    ) -> Answer:
        """Answer one prompt (chat template applied when the tokenizer has one)."""
        fmt = self.prompt_format
        check_text(prompt, "prompt")
        ids = fmt.encode(fmt.render([{"role": "user", "content": prompt}]), first=True)
        return self.generate_ids(
            ids, parse_recipe(recipe), max_new_tokens, Sampling(temperature, top_p, seed), allow_overflow
        )

    def session(
        self, context: str, recipe: Recipe | str | None = None, mode: str = "multi-request",
        allow_overflow: bool = False,
    ) -> Session:
        """Encode ``context`` once; ask it many questions (see :class:`kvlab.reuse.Session`)."""
        return Session(self, context, parse_recipe(recipe), mode, allow_overflow)


def _propagate_rows(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of every decoder layer: once a layer of this forward called
    :meth:`LayerContext.propagate_only`, the hidden states ``[b, t, D]`` and the positions of
    the forward are cut to those rows (original positions kept), and so are the per-token
    arguments every later layer receives (the rotary placeholders; the mask is unused by
    kvlab's attention and dropped)."""
    forward = kwargs.get(FORWARD_KWARG)
    rows = forward.scratch.get(PROPAGATED_ROWS) if isinstance(forward, ForwardContext) else None
    if rows is None:
        return None
    hidden, *rest = args
    if hidden.shape[1] != rows.numel():
        hidden = hidden[:, rows]
        forward.positions = forward.positions[rows]
    kwargs["position_ids"] = forward.positions[None]
    cos, sin = kwargs["position_embeddings"]
    if cos.shape[-2] != rows.numel():
        kwargs["position_embeddings"] = (cos[..., rows, :], sin[..., rows, :])
    kwargs["attention_mask"] = None
    return (hidden, *rest), kwargs


def _param_max(cls: type, name: str) -> float:
    from dataclasses import fields

    return next(f.metadata["max"] for f in fields(cls) if f.name == name)
