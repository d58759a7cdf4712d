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
from kvlab.engine.forward import BatchForward, ForwardContext, Phase, StopForward
from kvlab.engine.progress import progress_bar
from kvlab.engine.prompt import PromptFormat
from kvlab.engine.ragged import RaggedLayerKV
from kvlab.engine.rotary import DeferredRotary, Rotary, head_dim, layer_type_config
from kvlab.engine.sampling import Sampling, TokenSampler
from kvlab.engine.sequence import KVCache, Sequence
from kvlab.errors import InputError, ModelError, RecipeError
from kvlab.position.base import TRAINED_ROPE
from kvlab.recipe import Recipe, parse_recipe
from kvlab.engine.results import (
    Answer, Counters, Decoded, Stats, check_max_new_tokens, check_text,
)
from kvlab.reuse.documents import Documents
from kvlab.reuse.session import Session

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
GLOBAL_LAYER, LOCAL_LAYER = "full_attention", "sliding_attention"
"""transformers' ``layer_types``: a global layer attends over the whole sequence, a local one
over a sliding window of the last ``sliding_window`` tokens."""
SOFTMAX_SETTINGS = ("attn_logit_softcapping", "use_bidirectional_attention")
"""Config settings that change attention beyond causal softmax (Gemma-2's logit soft-capping,
bidirectional encoders): kvlab's kernels do not compute them, so a model setting one is
refused."""


def check_architecture(config: Any) -> None:
    """Refuse models whose attention kvlab would compute differently from the model."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = (
            "; for a Gemma-3 checkpoint load its text model (Gemma3ForCausalLM, model type "
            "gemma3_text)" if model_type == "gemma3" else ""
        )
        raise ModelError(
            f"model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}{hint}"
        )
    unknown = sorted(set(getattr(config, "layer_types", None) or []) - {GLOBAL_LAYER, LOCAL_LAYER})
    if unknown:
        raise ModelError(
            f"this {model_type} model has layer types {unknown}; kvlab runs "
            f"{GLOBAL_LAYER!r} and {LOCAL_LAYER!r} layers only"
        )
    for name in SOFTMAX_SETTINGS:
        if getattr(config, name, None):
            raise ModelError(
                f"this {model_type} model sets {name}={getattr(config, name)!r}; kvlab's "
                f"attention computes causal softmax attention without it (supported: {name} unset)"
            )


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: a global layer): from the config's ``layer_types``
    (Gemma-3's pattern of local and global layers; Qwen2's local layers from
    ``max_window_layers`` on, with ``use_sliding_window``), else, for a model without them
    (Mistral), every layer is local when ``sliding_window`` is shorter than the trained
    length (a window at least that long never masks a prompt the model accepts)."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        local = window is not None and window < config.max_position_embeddings
        layer_types = [LOCAL_LAYER if local else GLOBAL_LAYER] * config.num_hidden_layers
    if window is None:
        return [None] * len(layer_types)
    return [int(window) if t == LOCAL_LAYER else None for t in layer_types]


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
        self.windows = layer_windows(self.config)
        """Each layer's sliding window (None: a global layer; see :class:`SlidingLayerKV`)."""
        self.rope_config = layer_type_config(self.config, GLOBAL_LAYER)
        """The config the position method sees: the global layers' rope parameters."""
        self.local_rotary: Rotary | None = None
        """The local layers' RoPE, as trained (Gemma-3's ``rope_local_base_freq``)."""
        if any(w is not None for w in self.windows):
            self.local_rotary = TRAINED_ROPE.rotary(layer_type_config(self.config, LOCAL_LAYER), self.trained_length)
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
        self.check_layers(parsed)
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
        return Sequence(parsed, KVCache(self.config.num_hidden_layers, new_layer, self.windows), prepared)

    def check_layers(self, recipe: Recipe) -> None:
        """Refuse the recipe's methods that cannot run on this model's sliding-window layers
        (:attr:`Method.sliding_window_refusal`), and every method on a model without a global
        layer (nothing for it to act on); the others act on the global layers only."""
        local = sum(w is not None for w in self.windows)
        if not local:
            return
        layers = (
            f"this model ({self.name}), which has sliding-window layers ({local} of "
            f"{len(self.windows)} layers attend over the last "
            f"{max(w for w in self.windows if w is not None)} tokens only)"
        )
        for method in recipe.methods:
            if local == len(self.windows):
                raise RecipeError(
                    f"{method.name} is not supported on {layers}: kvlab's methods act on the global "
                    "layers and this model has none (its cache is already bounded by the window); "
                    "use the recipe full"
                )
            if method.sliding_window_refusal:
                raise RecipeError(f"{method.name} is not supported on {layers}: {method.sliding_window_refusal}")

    def context_window(self, recipe: Recipe) -> int:
        """Tokens the recipe's position method attends over on this model (as it runs here:
        DPE's calibrated scales are read, and refused when missing, before any prefill)."""
        position = recipe.position or TRAINED_ROPE
        return (position.prepare(self) or position).context_window(self.trained_length)

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
        forward = self._forward_context(sequence, len(ids), phase, stop_after, counts, pairs)
        positions = forward.positions
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

    def _forward_context(
        self, sequence: Sequence, tokens: int, phase: Phase, stop_after: int | None = None,
        counts: list[int] | None = None, pairs: list[int] | None = None,
    ) -> ForwardContext:
        """The :class:`ForwardContext` of ``tokens`` new tokens on top of ``sequence``."""
        start = sequence.seen
        return ForwardContext(
            recipe=sequence.recipe,
            cache=sequence.cache,
            positions=torch.arange(start, start + tokens, device=self.device),
            rotary=sequence.rotary(self.rope_config, start + tokens, self.trained_length),
            local_rotary=self.local_rotary,
            phase=phase,
            prepared=sequence.prepared,
            stop_after=stop_after,
            counts=sequence.layer_tokens if counts is None else counts,
            pairs=sequence.layer_pairs if pairs is None else pairs,
        )

    @torch.inference_mode()
    def decode_step(self, sequences: list[Sequence], tokens: list[int]) -> Tensor:
        """One decoding step of several sequences in one model forward: ``tokens[i]`` is run
        on top of ``sequences[i]``; next-token logits ``[len(sequences), vocab]``. The layers
        outside attention compute the rows together; each row attends over its own cache with
        its own recipe (:class:`BatchForward`), so every row's logits are those the sequence
        would get alone, up to the rounding of a batched matmul. Every recipe must batch its
        decoding (:attr:`Recipe.batches_decode`); one sequence is a plain :meth:`forward`."""
        if len(sequences) != len(tokens) or not sequences:
            raise ValueError(f"decode_step: {len(sequences)} sequences for {len(tokens)} tokens (one each, at least one)")
        if len(sequences) == 1:
            return self.forward(sequences[0], tokens, Phase.DECODE)[None]
        refused = sorted({str(s.recipe) for s in sequences if not s.recipe.batches_decode})
        if refused:
            raise ValueError(f"decode_step: recipe {', '.join(refused)} decodes one sequence per forward")
        batch = BatchForward([self._forward_context(s, 1, Phase.DECODE) for s in sequences])
        positions = torch.stack([f.positions for f in batch.forwards])  # [batch, 1]
        out = self.model(
            input_ids=torch.tensor([[t] for t in tokens], device=self.device),
            position_ids=positions,
            cache=sequences[0].cache,  # transformers reads a length from it; kvlab attention ignores it
            use_cache=True,
            logits_to_keep=1,
            **{FORWARD_KWARG: batch},
        )
        self.counters.forwards += 1
        return out.logits[:, -1].float()

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
        scratch = Sequence(
            sequence.recipe, KVCache(self.config.num_hidden_layers, windows=self.windows), sequence.prepared
        )
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

    def documents(
        self, recipe: Recipe | str = "ape", instruction: str = "", allow_overflow: bool = False,
    ) -> Documents:
        """Encode a shared prefix (the chat template's start and ``instruction``) once; add
        documents, each encoded once after it; ask questions over any of them in any order
        (APE: see :class:`kvlab.reuse.documents.Documents`)."""
        return Documents(self, recipe, instruction, allow_overflow)


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
