"""Deterministic long-context task generators, in the style of RULER and SCBench.

``TASKS`` maps a task name to a :class:`Task`; ``TASKS[name].generate(tokenizer,
target_tokens, seed, index=0, depth=None)`` returns a :class:`~kvlab.bench.cases.Case` whose
context fills ``target_tokens`` tokens of ``tokenizer`` (within 2% from 500 tokens on).

RULER (arXiv:2404.06654): ``niah_single``, ``niah_single_prose``, ``niah_multikey``,
``niah_multivalue``, ``niah_multiquery``, ``variable_tracking``, ``common_words``,
``frequent_words``, and the context-extension papers' ``passkey`` (arXiv:2305.16300) - one
question each. SCBench (arXiv:2412.10319): ``kv_retrieval``,
``prefix_suffix``, ``multi_hop``, ``math_find``, and ``niah_multiturn`` (RULER's needles, one
key asked per turn) - ``num_turns`` (default 3) questions on one shared context.
"""

from __future__ import annotations

from typing import Any

from kvlab.bench.cases import Case
from kvlab.bench.tasks.aggregation import common_words, frequent_words
from kvlab.bench.tasks.base import Request, Task
from kvlab.bench.tasks.chains import multi_hop, variable_tracking
from kvlab.bench.tasks.niah import niah
from kvlab.bench.tasks.passkey import passkey
from kvlab.bench.tasks.shared import kv_retrieval, math_find, prefix_suffix
from kvlab.errors import InputError

_TASKS = [
    Task("niah_single", "ruler", "one needle in the noise haystack", niah,
         {"haystack": "noise"}, uses_depth=True),
    Task("niah_single_prose", "ruler", "one needle in the prose haystack", niah,
         {"haystack": "prose"}, uses_depth=True),
    Task("niah_multikey", "ruler", "a needle among 3 distractor needles with other keys", niah,
         {"haystack": "prose", "num_keys": 4}, uses_depth=True),
    Task("niah_multivalue", "ruler", "4 values for one key; answer all", niah,
         {"haystack": "prose", "num_values": 4}, uses_depth=True),
    Task("niah_multiquery", "ruler", "4 keys asked in one question; answer all values", niah,
         {"haystack": "prose", "num_keys": 4, "num_queries": 4}, uses_depth=True),
    Task("niah_multiturn", "scbench", "3 needles, one key asked per turn (shared context)",
         niah, {"haystack": "prose", "num_keys": 3, "num_turns": 3}, uses_depth=True),
    Task("passkey", "ruler", "a 5-digit pass key in repeated filler (Landmark Attention)",
         passkey, {"digits": 5}, uses_depth=True),
    Task("variable_tracking", "ruler", "follow a 4-hop chain of variable assignments",
         variable_tracking, {"num_chains": 1, "num_hops": 4}),
    Task("common_words", "ruler", "the 10 most common words of a numbered list", common_words,
         {"num_common": 10, "freq_common": 30, "freq_uncommon": 3}),
    Task("frequent_words", "ruler", "the 3 most frequent coded words (Zipf counts)",
         frequent_words, {"num_answers": 3, "alpha": 2.0}),
    Task("kv_retrieval", "scbench", "values of UUID keys in a JSON object", kv_retrieval,
         {"num_turns": 3}),
    Task("prefix_suffix", "scbench", "the word with a given prefix and suffix", prefix_suffix,
         {"num_turns": 3}),
    Task("multi_hop", "scbench", "one variable chain per turn", multi_hop,
         {"num_turns": 3, "num_hops": 4}),
    Task("math_find", "scbench", "max / min / ... of a list of numbers", math_find,
         {"num_turns": 3}),
]
TASKS: dict[str, Task] = {task.name: task for task in _TASKS}


def get_task(name: str) -> Task:
    """The task named ``name``; an :class:`~kvlab.errors.InputError` lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}: use one of {', '.join(TASKS)}") from None


def generate(name: str, tokenizer: Any, target_tokens: int, seed: int, index: int = 0,
             depth: float | None = None, **params: Any) -> Case:
    """Shorthand for ``get_task(name).generate(...)``."""
    return get_task(name).generate(tokenizer, target_tokens, seed, index, depth, **params)


__all__ = ["TASKS", "Request", "Task", "generate", "get_task"]
