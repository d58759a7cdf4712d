"""Sessions: a shared context encoded once, many questions (SCBench's two modes).

Li et al., "SCBench: A KV Cache-Centric Analysis of Long-Context Methods", arXiv:2412.10319.

- ``multi-request``: each question is answered against the shared (possibly compressed)
  context cache, and its tokens are discarded afterwards.
- ``multi-turn``: each question and its answer stay in the cache, like a chat.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from kvlab.engine.sampling import Sampling
from kvlab.errors import InputError
from kvlab.engine.prompt import QUESTION_SEPARATOR

if TYPE_CHECKING:
    from kvlab.engine.engine import Answer, Engine, Stats
    from kvlab.recipe import Recipe

MODES = ("multi-request", "multi-turn")


class Session:
    """A context prefilled (and compressed) once; :meth:`ask` answers questions against it."""

    def __init__(
        self, engine: Engine, context: str, recipe: Recipe, mode: str = "multi-request",
        allow_overflow: bool = False,
    ) -> None:
        if mode not in MODES:
            raise InputError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
        if not context.strip():
            raise InputError("the context is empty")
        self.engine = engine
        self.mode = mode
        self.recipe = recipe
        self.allow_overflow = allow_overflow
        self._format = engine._require_tokenizer()
        self._context = context
        self._messages: list[dict[str, str]] = []
        self._consumed = self._format.context_head(context)
        self._pending: list[int] = []  # generated tokens not yet run through the model
        ids = self._format.encode(self._consumed, first=True)
        self.cache = engine.new_cache(recipe)
        engine.check_fits(recipe, len(ids) + 1, 1, allow_overflow)
        start = time.perf_counter()
        engine.prefill(self.cache, ids, compress=True)
        from kvlab.engine.engine import _Decoded

        self.context_stats: Stats = engine.measure(
            self.cache, len(ids), len(ids), _Decoded(), time.perf_counter() - start
        )
        self._mark = self.cache.mark()
        self._start = (self._consumed, list(self._messages), list(self._pending))

    def ask(
        self, question: str, answer_prefix: str = "", max_new_tokens: int = 64,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
        *, reference_answer: str | None = None, teacher_tokens: list[int] | None = None,
        keep_logprobs: bool = False,
    ) -> Answer:
        """Answer ``question`` against the session's cache.

        Measurement options (used by ``kvlab bench``):
        ``reference_answer`` — in multi-turn mode, keep this (gold) answer in the history
        instead of the generated one, as SCBench does, so every recipe sees the same history;
        ``teacher_tokens`` — also score this answer token by token (``teacher_logprobs``);
        ``keep_logprobs`` — return the generated tokens' distributions (``logprobs``).
        """
        from kvlab.engine.engine import Answer

        if not question.strip():
            raise InputError("the question is empty")
        sampling = Sampling(temperature, top_p, seed)
        content = question if self._messages else self._context + QUESTION_SEPARATOR + question
        messages = [*self._messages, {"role": "user", "content": content}]
        full = self._format.render(messages, answer_prefix)
        ids = self._pending + self._format.encode(
            self._format.remainder(full, self._consumed), first=False
        )
        engine, cache = self.engine, self.cache
        before = cache.get_seq_length()
        engine.check_fits(self.recipe, before + len(ids) + max_new_tokens, max_new_tokens, self.allow_overflow)
        start = time.perf_counter()
        logits = engine.prefill(cache, ids, compress=False)
        prefill_s = time.perf_counter() - start
        question_mark = cache.mark()
        teacher = None
        if teacher_tokens:
            teacher = engine.teacher_force(cache, logits, teacher_tokens)
            cache.rollback(question_mark)
        decoded = engine.decode(
            cache, logits, max_new_tokens, sampling.sampler(engine.device), keep_logprobs
        )
        tokenizer = engine.tokenizer
        text = tokenizer.decode(decoded.tokens, skip_special_tokens=True)
        stats = engine.measure(cache, before + len(ids), len(ids), decoded, prefill_s)
        if self.mode == "multi-turn" and reference_answer is not None:
            cache.rollback(question_mark)
            self._messages = [*messages, {"role": "assistant", "content": answer_prefix + reference_answer}]
            self._consumed, self._pending = full, []
        elif self.mode == "multi-turn":
            self._messages = [*messages, {"role": "assistant", "content": answer_prefix + text}]
            self._consumed = full + tokenizer.decode(decoded.tokens, skip_special_tokens=False)
            self._pending = decoded.tokens[-1:]
        else:
            cache.rollback(self._mark)
            self._consumed, self._messages, self._pending = (
                self._start[0], list(self._start[1]), list(self._start[2])
            )
        return Answer(
            text=text, token_ids=decoded.tokens, stats=stats,
            logprobs=torch.stack(decoded.logprobs) if decoded.logprobs else None,
            teacher_logprobs=teacher,
        )
