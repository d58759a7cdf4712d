"""The engine: prefill, compress, decode — one recipe at a time, on one loaded model.

The hot loop is visible here: :meth:`Engine.prefill` runs the prompt through the model in
chunks (compressing at the end), :meth:`Engine.decode` samples one token per forward. Every
forward goes through kvlab's attention function and a :class:`KVCache` built for the recipe.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from kvlab.engine.attention import ATTENTION_NAME
from kvlab.engine.cache import ForwardStep, KVCache, LayerKV
from kvlab.engine.prompt import PromptFormat
from kvlab.engine.ragged import RaggedLayerKV
from kvlab.engine.rotary import DeferredRotary, Rotary, head_dim
from kvlab.engine.sampling import Sampling, TokenSampler
from kvlab.errors import InputError, ModelError
from kvlab.position.base import TRAINED_ROPE
from kvlab.recipe import Recipe, parse_recipe

if TYPE_CHECKING:
    from kvlab.reuse.session import Session

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Stats:
    """Measured numbers of one answer (nothing here is estimated).

    - ``prompt_tokens``: tokens before the answer (context, earlier turns, question);
    - ``prefilled_tokens``: tokens this call ran through the model's prefill;
    - ``new_tokens``: generated tokens;
    - ``kv_tokens``: cache entries per layer and KV head when the answer ended (mean over
      layers; heads of a layer always hold the same count);
    - ``kv_bytes``: bytes of every tensor the cache held then (all layers);
    - ``prefill_s`` / ``decode_s``: wall-clock seconds of the prefill and of the decoding.
    """

    prompt_tokens: int
    prefilled_tokens: int
    new_tokens: int
    kv_tokens: float
    kv_bytes: int
    prefill_s: float
    decode_s: float

    @property
    def decode_s_per_token(self) -> float:
        return self.decode_s / self.new_tokens if self.new_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_s_per_token": self.decode_s_per_token}


@dataclass
class Answer:
    """A generated answer: text (special tokens removed), token ids, and its stats.

    ``logprobs`` ``[new_tokens, vocab]``: log-softmax of the distributions the tokens were
    drawn from (when asked for). ``teacher_logprobs`` ``[len(teacher), vocab]``: the
    distributions at each position of a given teacher answer fed instead (when one was given).
    """

    text: str
    token_ids: list[int]
    stats: Stats
    logprobs: Tensor | None = None
    teacher_logprobs: Tensor | None = None


@dataclass
class Counters:
    """Running totals of the engine's work (for tests and reports)."""

    prefilled_tokens: int = 0
    decoded_tokens: int = 0
    forwards: int = 0


@dataclass
class _Decoded:
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    logprobs: list[Tensor] = field(default_factory=list)


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
    """A loaded model and tokenizer, ready to run recipes (see :func:`kvlab.load`)."""

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

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return ids

    # -- the cache and one forward --------------------------------------------------------
    def new_cache(self, recipe: Recipe | str | None) -> KVCache:
        parsed = parse_recipe(recipe)
        if parsed.quantize is not None:
            new_layer = parsed.quantize.new_layer
        elif parsed.compress is not None and parsed.compress.ragged_heads:
            new_layer = RaggedLayerKV
        else:
            new_layer = LayerKV
        cache = KVCache(self.config.num_hidden_layers, new_layer)
        cache.recipe = parsed
        for method in parsed.methods:
            state = method.prepare(self)
            if state is not None:
                cache.prepared[method.stage] = state
        return cache

    def context_window(self, recipe: Recipe) -> int:
        return (recipe.position or TRAINED_ROPE).context_window(self.trained_length)

    def _rotary(self, cache: KVCache, seq_len: int) -> Rotary:
        position = cache.recipe.position or TRAINED_ROPE
        key = position.frequency_key(seq_len, self.trained_length)
        memo = getattr(cache, "_rotary_memo", None)
        if memo is None or memo[0] != key:
            memo = (key, position.rotary(self.config, seq_len))
            cache._rotary_memo = memo  # type: ignore[attr-defined]
        return memo[1]

    @torch.inference_mode()
    def forward(
        self, cache: KVCache, ids: list[int], *, building: bool, compress: bool = False,
        compressing: bool = False,
    ) -> Tensor:
        """Run ``ids`` through the model on top of ``cache``; next-token logits ``[vocab]``."""
        start = cache.get_seq_length()
        positions = torch.arange(start, start + len(ids), device=self.device)
        position = cache.recipe.position or TRAINED_ROPE
        cache.step = ForwardStep(
            positions=positions,
            rotary=self._rotary(cache, start + len(ids)),
            rotate_keys=not position.stores_pre_rope,
            building=building,
            compressing=compressing or compress,
            compress=compress,
        )
        try:
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                position_ids=positions[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                kvlab_cache=cache,
            )
        finally:
            cache.step = None
        self.counters.forwards += 1
        return out.logits[0, -1].float()

    # -- prefill and decode -----------------------------------------------------------------
    def chunks(self, total: int) -> list[tuple[int, int]]:
        """Prefill chunk boundaries; a short tail joins the previous chunk so the last chunk
        holds at least half a chunk (compression's observation window lives there)."""
        size = self.prefill_chunk
        bounds = [(s, min(s + size, total)) for s in range(0, total, size)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < size // 2:
            (a, _), (_, e) = bounds[-2], bounds[-1]
            bounds[-2:] = [(a, e)]
        return bounds

    def prefill(self, cache: KVCache, ids: list[int], *, compress: bool) -> Tensor:
        """Encode ``ids`` into ``cache`` chunk by chunk; compress after the last chunk."""
        if not ids:
            raise InputError("nothing to prefill: the prompt encodes to zero tokens")
        bounds = self.chunks(len(ids))
        show = self.progress and len(bounds) > 2
        with progress_bar(show) as bar:
            task = bar.add_task(f"prefill {len(ids)} tokens", total=len(ids))
            for i, (a, b) in enumerate(bounds):
                last = i == len(bounds) - 1
                logits = self.forward(
                    cache, ids[a:b], building=True, compress=compress and last, compressing=compress
                )
                bar.update(task, advance=b - a)
        self.counters.prefilled_tokens += len(ids)
        return logits

    def decode(
        self, cache: KVCache, logits: Tensor, max_new_tokens: int, sampler: TokenSampler,
        keep_logprobs: bool = False,
    ) -> _Decoded:
        """Generate up to ``max_new_tokens``; stops after a stop token. The last token is not
        run through the model (it is returned, not cached)."""
        result = _Decoded()
        start = time.perf_counter()
        for i in range(max_new_tokens):
            if keep_logprobs:
                result.logprobs.append(torch.log_softmax(logits, dim=-1))
            token = sampler(logits)
            result.tokens.append(token)
            if token in self.stop_ids or i == max_new_tokens - 1:
                break
            logits = self.forward(cache, [token], building=False)
        result.seconds = time.perf_counter() - start
        self.counters.decoded_tokens += len(result.tokens)
        return result

    def teacher_force(self, cache: KVCache, logits: Tensor, tokens: list[int]) -> Tensor:
        """Log-probabilities ``[len(tokens), vocab]`` the model gives each of ``tokens`` when
        they are fed one by one after ``logits`` (the state the prefill left)."""
        rows = [torch.log_softmax(logits, dim=-1)]
        for token in tokens[:-1]:
            rows.append(torch.log_softmax(self.forward(cache, [token], building=False), dim=-1))
        return torch.stack(rows)

    # -- checks -------------------------------------------------------------------------------
    def check_fits(
        self, recipe: Recipe, total_tokens: int, max_new_tokens: int, allow_overflow: bool
    ) -> None:
        """Refuse a prompt that does not fit the window of the recipe's position method."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
        window = self.context_window(recipe)
        if total_tokens <= window or allow_overflow:
            return
        factor = 2 ** math.ceil(math.log2(total_tokens / self.trained_length))
        raise InputError(
            f"{total_tokens} tokens (prompt + max_new_tokens {max_new_tokens}) exceed the "
            f"{window}-token window of {self.name} with recipe '{recipe}'; add a position "
            f"method, e.g. 'yarn(factor={factor})' or 'self_extend(group_size={max(2, factor)})', "
            "or allow the overflow (allow_overflow=True, --allow-overflow) to watch the model fail"
        )

    def _require_tokenizer(self) -> PromptFormat:
        if self.format is None:
            raise ModelError("this engine has no tokenizer; use generate_ids with token ids")
        return self.format

    # -- public API --------------------------------------------------------------------------
    def generate_ids(
        self, ids: list[int], recipe: Recipe | str | None = None, max_new_tokens: int = 64,
        sampling: Sampling | None = None, allow_overflow: bool = False,
    ) -> Answer:
        """Generate from token ids (the prompt is prefilled and compressed as one)."""
        cache = self.new_cache(recipe)
        self.check_fits(cache.recipe, len(ids) + max_new_tokens, max_new_tokens, allow_overflow)
        start = time.perf_counter()
        logits = self.prefill(cache, list(ids), compress=True)
        prefill_s = time.perf_counter() - start
        decoded = self.decode(cache, logits, max_new_tokens, (sampling or Sampling()).sampler(self.device))
        return Answer(
            text=self.tokenizer.decode(decoded.tokens, skip_special_tokens=True) if self.tokenizer else "",
            token_ids=decoded.tokens,
            stats=self.measure(cache, len(ids), len(ids), decoded, prefill_s),
        )

    def generate(
        self, prompt: str, recipe: Recipe | str | None = None, max_new_tokens: int = 64,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
        allow_overflow: bool = False,
    ) -> Answer:
        """Answer one prompt (chat template applied when the tokenizer has one)."""
        fmt = self._require_tokenizer()
        if not prompt.strip():
            raise InputError("the prompt is empty")
        ids = fmt.encode(fmt.render([{"role": "user", "content": prompt}]), first=True)
        return self.generate_ids(
            ids, recipe, max_new_tokens, Sampling(temperature, top_p, seed), allow_overflow
        )

    def session(
        self, context: str, recipe: Recipe | str | None = None, mode: str = "multi-request",
        allow_overflow: bool = False,
    ) -> Session:
        """Encode ``context`` once; ask it many questions (see :class:`kvlab.reuse.Session`)."""
        from kvlab.reuse.session import Session

        return Session(self, context, parse_recipe(recipe), mode, allow_overflow)

    def measure(
        self, cache: KVCache, prompt_tokens: int, prefilled: int, decoded: _Decoded, prefill_s: float
    ) -> Stats:
        return Stats(
            prompt_tokens=prompt_tokens,
            prefilled_tokens=prefilled,
            new_tokens=len(decoded.tokens),
            kv_tokens=cache.mean_entries(),
            kv_bytes=cache.nbytes(),
            prefill_s=prefill_s,
            decode_s=decoded.seconds,
        )


def progress_bar(show: bool, unit: str = "tokens") -> Progress:
    """kvlab's progress display for long work (on stderr, removed when done): ``done/total
    unit`` and the time left; nothing when ``show`` is false."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(),
        TextColumn(f"{{task.completed}}/{{task.total}} {unit}"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True, disable=not show,
    )
