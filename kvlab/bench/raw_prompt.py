"""RULER's prompt exactly as RULER sends it: ``input + answer_prefix``, no chat template.

RULER (NVIDIA/RULER, ``scripts/pred/call_api.py``) prompts a model with the record's
``input`` followed by its ``answer_prefix`` (spaces kept) and tokenizes that string as one,
with the tokenizer's own special tokens (``add_special_tokens=True``); the model template, if
any, is already inside ``input`` (RULER's ``--model_template_type``). ``kvlab bench
--raw-prompt`` does the same for RULER ``--data`` records, where kvlab's default wraps the
context and question in the model's chat template (a few dozen tokens more, past RULER's
budget) and strips the answer prefix.

:class:`RawPromptSession` has the part of :class:`kvlab.reuse.Session`'s interface the runner
uses (``context_stats``, ``ask``): the context (``input`` up to the question line) is
prefilled and compressed once, then each turn's ``question + answer_prefix`` is prefilled and
answered against it, and dropped (RULER records have one turn). The token ids are those of
the whole prompt tokenized at once, split where the context ends, so the model reads the same
ids RULER gives it.
"""

from __future__ import annotations

import time

from kvlab.engine.engine import Answer, Engine, Stats
from kvlab.engine.sampling import Sampling
from kvlab.errors import InputError
from kvlab.recipe import Recipe, parse_recipe
from kvlab.reuse.session import answer_turn


class RawPromptSession:
    """A context sent as plain text (no chat template); :meth:`ask` continues it verbatim."""

    def __init__(self, engine: Engine, context: str, recipe: Recipe | str | None = None,
                 allow_overflow: bool = False) -> None:
        if engine.tokenizer is None:
            raise InputError("a raw prompt needs the model's tokenizer")
        if not context:
            raise InputError("the context is empty")
        self.engine = engine
        self.recipe = parse_recipe(recipe)
        self.allow_overflow = allow_overflow
        self._context = context
        self._context_ids = self._encode(context)
        engine.check_fits(self.recipe, len(self._context_ids), 0, allow_overflow)
        self.sequence = engine.new_sequence(self.recipe)
        start = time.perf_counter()
        engine.prefill(self.sequence, self._context_ids, compress=True)
        n = len(self._context_ids)
        self.context_stats = Stats.measure(self.sequence, n, n, time.perf_counter() - start)
        self._mark = self.sequence.mark()

    def _encode(self, text: str) -> list[int]:
        return list(self.engine.tokenizer(text, add_special_tokens=True)["input_ids"])

    def prompt_ids(self, question: str, answer_prefix: str = "") -> list[int]:
        """Ids of the whole prompt ``context + question + answer_prefix``, tokenized as one."""
        return self._encode(self._context + question + answer_prefix)

    def ask(
        self, question: str, answer_prefix: str = "", max_new_tokens: int = 64,
        *, reference_answer: str | None = None, teacher_tokens: list[int] | None = None,
        keep_logprobs: bool = False,
    ) -> Answer:
        """Answer ``context + question + answer_prefix`` (verbatim) against the context cache.

        ``reference_answer`` is accepted for the runner's sake and unused: each question is
        answered against the context alone (RULER records have one turn)."""
        del reference_answer
        engine, sequence = self.engine, self.sequence
        whole = self.prompt_ids(question, answer_prefix)
        n = len(self._context_ids)
        if whole[:n] != self._context_ids:
            raise InputError(
                "the raw prompt's tokens do not split where the context ends (the tokenizer "
                "merges the context's last characters with the question's); run without "
                "--raw-prompt"
            )
        ids = whole[n:]
        if not ids:
            raise InputError("the raw prompt has nothing after the context (no question, no "
                             "answer prefix)")
        answer, _ = answer_turn(
            engine, sequence, ids, max_new_tokens, Sampling().sampler(engine.device),
            allow_overflow=self.allow_overflow, teacher_tokens=teacher_tokens,
            keep_logprobs=keep_logprobs,
        )
        sequence.rollback(self._mark)
        return answer
