"""Sessions: a shared context encoded once, many questions (SCBench's two modes).

Li et al., "SCBench: A KV Cache-Centric Analysis of Long-Context Methods", arXiv:2412.10319.

- ``multi-request``: each question is answered against the shared (possibly compressed)
  context cache, and its tokens are discarded afterwards.
- ``multi-turn``: each question and its answer stay in the cache, like a chat.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import torch

from torch import Tensor

from kvlab.engine.prompt import QUESTION_SEPARATOR, PromptFormat
from kvlab.engine.results import Answer, Decoded, Stats, check_max_new_tokens, check_text
from kvlab.engine.sampling import Sampling, TokenSampler
from kvlab.engine.cache import CacheMark
from kvlab.engine.sequence import Sequence
from kvlab.errors import InputError
from kvlab.recipe import Recipe, parse_recipe
from kvlab.reuse import persist

MODES = ("multi-request", "multi-turn")


class SessionEngine(Protocol):
    """What a session needs of an engine (:class:`kvlab.Engine` is one): the session is built
    on the engine's public API only."""

    device: Any
    tokenizer: Any
    model: Any
    name: str

    @property
    def prompt_format(self) -> PromptFormat: ...

    def check_fits(self, recipe: Recipe, prompt_tokens: int, max_new_tokens: int, allow_overflow: bool) -> None: ...

    def new_sequence(self, recipe: Recipe) -> Sequence: ...

    def prefill(self, sequence: Sequence, ids: list[int], *, compress: bool) -> Tensor: ...

    def decode(
        self, sequence: Sequence, logits: Tensor, max_new_tokens: int, sampler: TokenSampler,
        keep_logprobs: bool = False,
    ) -> Decoded: ...

    def teacher_force(self, sequence: Sequence, logits: Tensor, tokens: list[int]) -> Tensor: ...


class Session:
    """A context prefilled (and compressed) once; :meth:`ask` answers questions against it."""

    def __init__(
        self, engine: SessionEngine, context: str, recipe: Recipe, mode: str = "multi-request",
        allow_overflow: bool = False,
    ) -> None:
        if not isinstance(mode, str) or mode not in MODES:
            raise InputError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
        if not isinstance(recipe, Recipe):
            raise InputError(f"recipe={recipe!r}: a Session takes a parsed kvlab.Recipe (Engine.session parses strings)")
        check_text(context, "context")
        self.engine = engine
        self.mode = mode
        self.recipe = recipe
        self.allow_overflow = allow_overflow
        self._format = engine.prompt_format
        self._context = context
        self._messages: list[dict[str, str]] = []
        self._consumed = self._format.context_head(context)
        self._pending: list[int] = []  # generated tokens not yet run through the model
        ids = self._format.encode(self._consumed, first=True)
        engine.check_fits(recipe, len(ids), 0, allow_overflow)
        self.sequence = engine.new_sequence(recipe)
        start = time.perf_counter()
        engine.prefill(self.sequence, ids, compress=True)
        self.context_stats: Stats = Stats.measure(
            self.sequence, len(ids), len(ids), time.perf_counter() - start
        )
        self._mark = self.sequence.mark()
        self._start = (self._consumed, list(self._messages), list(self._pending))

    # -- persistent KV ------------------------------------------------------------------------
    def save(self, path: str | Path) -> int:
        """Write the session (its encoded, possibly compressed, cache and where the
        conversation stands) to ``path``, a safetensors file with a JSON header naming the
        model, recipe, tokenizer hash and kvlab version (:mod:`kvlab.reuse.persist`); returns
        the file's size in bytes. Only the state a request left is saved: in multi-request
        mode, the context alone."""
        header = {
            "format": persist.FORMAT, **_identity(self.engine, str(self.recipe)),
            "mode": self.mode, "context": self._context, "consumed": self._consumed,
            "messages": self._messages, "pending": self._pending,
            "context_stats": {k: v for k, v in self.context_stats.as_dict().items() if k != "decode_s_per_token"},
        }
        return persist.write(path, header, self.sequence.cache.layers)

    @classmethod
    def load(
        cls, engine: SessionEngine, path: str | Path, recipe: Recipe | str | None = None,
        allow_overflow: bool = False,
    ) -> Session:
        """The session saved in ``path``, ready to answer as it would have. Refused (an
        :class:`InputError` naming the field and both values) when the file was saved by
        another kvlab version or for another model, tokenizer or (when given) ``recipe``."""
        header = persist.read_header(path)
        expected = _identity(engine, str(parse_recipe(recipe)) if recipe is not None else header.get("recipe"))
        persist.check_matches(path, header, expected)
        parsed = parse_recipe(header["recipe"])
        _, layers = persist.read(path, engine.device)
        session = cls.__new__(cls)
        session.engine, session.mode, session.recipe = engine, header["mode"], parsed
        session.allow_overflow = allow_overflow
        session._format = engine.prompt_format
        session._context, session._consumed = header["context"], header["consumed"]
        session._messages, session._pending = header["messages"], header["pending"]
        session.sequence = engine.new_sequence(parsed)
        if len(layers) != len(session.sequence.cache.layers):
            raise InputError(f"{str(path)!r} holds {len(layers)} layers, the model has {len(session.sequence.cache.layers)}")
        session.sequence.cache.layers[:] = layers
        session.context_stats = Stats(**header["context_stats"])
        session._mark = session.sequence.mark()
        session._start = (session._consumed, list(session._messages), list(session._pending))
        return session

    @property
    def transcript(self) -> str:
        """The rendered text the session's cache holds now: the context and, in multi-turn
        mode, every earlier question and answer (chat template included)."""
        return self._consumed

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
        check_text(question, "question")
        if not isinstance(answer_prefix, str):
            raise InputError(f"answer_prefix={answer_prefix!r}: must be a string")
        check_max_new_tokens(max_new_tokens)
        sampling = Sampling(temperature, top_p, seed)
        content = question if self._messages else self._context + QUESTION_SEPARATOR + question
        messages = [*self._messages, {"role": "user", "content": content}]
        full = self._format.render(messages, answer_prefix)
        ids = self._pending + self._format.encode(
            self._format.remainder(full, self._consumed), first=False
        )
        sequence = self.sequence
        answer, question_mark = answer_turn(
            self.engine, sequence, ids, max_new_tokens, sampling.sampler(self.engine.device),
            allow_overflow=self.allow_overflow, teacher_tokens=teacher_tokens,
            keep_logprobs=keep_logprobs,
        )
        text, tokens = answer.text, answer.token_ids
        if self.mode == "multi-turn" and reference_answer is not None:
            sequence.rollback(question_mark)
            self._messages = [*messages, {"role": "assistant", "content": answer_prefix + reference_answer}]
            self._consumed, self._pending = full, []
        elif self.mode == "multi-turn":
            self._messages = [*messages, {"role": "assistant", "content": answer_prefix + text}]
            self._consumed = full + self.engine.tokenizer.decode(tokens, skip_special_tokens=False)
            self._pending = tokens[-1:]
        else:
            sequence.rollback(self._mark)
            self._consumed, self._messages, self._pending = (
                self._start[0], list(self._start[1]), list(self._start[2])
            )
        return answer


def _identity(engine: SessionEngine, recipe: str | None) -> dict[str, Any]:
    """What a saved cache is valid for, in the order a mismatch is reported."""
    return {
        "kvlab_version": persist.kvlab_version(), "model": engine.name,
        "model_fingerprint": persist.model_fingerprint(engine.model),
        "tokenizer_sha256": persist.tokenizer_sha256(engine.tokenizer), "recipe": recipe,
    }


def answer_turn(
    engine: SessionEngine, sequence: Sequence, ids: list[int], max_new_tokens: int,
    sampler: TokenSampler, *, allow_overflow: bool = False,
    teacher_tokens: list[int] | None = None, keep_logprobs: bool = False,
) -> tuple[Answer, CacheMark]:
    """One turn on a built cache: append the question's ``ids``, optionally teacher-force
    ``teacher_tokens`` (then undo them), and generate. Returns the answer and the mark taken
    after the question (before the answer), for the caller to keep or drop what follows."""
    before = sequence.seen
    engine.check_fits(sequence.recipe, before + len(ids), max_new_tokens, allow_overflow)
    start = time.perf_counter()
    logits = engine.prefill(sequence, ids, compress=False)
    prefill_s = time.perf_counter() - start
    question_mark = sequence.mark()
    teacher = None
    if teacher_tokens:
        teacher = engine.teacher_force(sequence, logits, teacher_tokens)
        sequence.rollback(question_mark)
    decoded = engine.decode(sequence, logits, max_new_tokens, sampler, keep_logprobs)
    answer = Answer(
        text=engine.tokenizer.decode(decoded.tokens, skip_special_tokens=True),
        token_ids=decoded.tokens,
        stats=Stats.measure(sequence, before + len(ids), len(ids), prefill_s, decoded),
        logprobs=torch.stack(decoded.logprobs) if decoded.logprobs else None,
        teacher_logprobs=teacher,
    )
    return answer, question_mark
