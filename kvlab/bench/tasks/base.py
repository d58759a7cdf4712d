"""The task interface: a :class:`Task` turns (tokenizer, length, seed, index, depth) into a Case.

Every random choice comes from one ``random.Random`` seeded by (task, seed, index) — never the
global RNG — and is made before the context is fitted to the target length, so a case is a
pure function of its arguments. The target length and the depth only change how much haystack
there is and where the needles sit: a length x depth grid of one seed asks the same question
of the same needle in every cell.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvlab.bench.cases import Case, Turn
from kvlab.bench.fit import Fit, count_many, fit_units, token_counter
from kvlab.errors import InputError

MAX_TURNS = 5


@dataclass
class Request:
    """What a generator is asked for, plus its random source and token counting."""

    task: str
    tokenizer: Any
    target: int
    seed: int
    index: int
    depth: float | None
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"kvlab.bench|{self.task}|{self.seed}|{self.index}")
        self._count = token_counter(self.tokenizer)

    def count(self, text: str) -> int:
        """Tokens in ``text`` (no special tokens)."""
        return self._count(text)

    def count_many(self, texts: list[str]) -> list[int]:
        """Tokens in each of several short texts (one batched call)."""
        return count_many(self.tokenizer, texts)

    def fit(self, build: Callable[[int], str], *, lo: int = 0, hi: int = 50_000_000) -> Fit:
        """The number of units whose rendered context is closest to the target length."""
        return fit_units(build, self.count, self.target, lo=lo, hi=hi)

    def child_rng(self) -> random.Random:
        """A new generator seeded from ``rng`` (for lazily extended unit streams)."""
        return random.Random(self.rng.getrandbits(64))

    def pick_depth(self) -> float:
        """The requested depth, or one drawn uniformly (two decimals) when none was given."""
        if self.depth is not None:
            return self.depth
        return round(self.rng.uniform(0.0, 1.0), 2)

    def case(
        self, fit: Fit, turns: list[Turn], *, depth: float | None = None, **meta: Any
    ) -> Case:
        """The finished :class:`Case`; ``meta`` gains the context's actual token count."""
        case_id = f"{self.task}-{self.target}-{self.seed}-{self.index}"
        if self.depth is not None:
            case_id += f"-d{self.depth:g}"
        meta = {"tokens": fit.tokens, "units": fit.units, "seed": self.seed, **meta}
        return Case(case_id, self.task, fit.text, turns, self.target, depth, meta)


def check_turns(num_turns: int) -> int:
    if not isinstance(num_turns, int) or not 1 <= num_turns <= MAX_TURNS:
        raise InputError(f"num_turns={num_turns!r}: use an integer from 1 to {MAX_TURNS}")
    return num_turns


@dataclass(frozen=True)
class Task:
    """A named generator with its fixed parameters (e.g. the haystack kind)."""

    name: str
    family: str  # "ruler" (one question) or "scbench" (several questions on one context)
    description: str
    builder: Callable[..., Case]
    params: Mapping[str, Any] = field(default_factory=dict)
    uses_depth: bool = False

    def generate(
        self,
        tokenizer: Any,
        target_tokens: int,
        seed: int,
        index: int = 0,
        depth: float | None = None,
        **overrides: Any,
    ) -> Case:
        """One case of about ``target_tokens`` context tokens (within 2% from 500 tokens on).

        ``depth`` in [0, 1] places the asked needle (tasks with ``uses_depth``; others ignore
        it); ``overrides`` replace task parameters such as ``num_turns``.
        """
        if not isinstance(target_tokens, int) or target_tokens < 1:
            raise InputError(f"target_tokens={target_tokens!r}: use a positive integer")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise InputError(f"depth={depth!r}: use a number in [0, 1]")
        unknown = set(overrides) - set(self.params)
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise InputError(
                f"task {self.name} has no parameter {sorted(unknown)[0]!r} (has: {allowed})"
            )
        depth = depth if self.uses_depth else None
        request = Request(self.name, tokenizer, target_tokens, seed, index, depth)
        return self.builder(request, **{**self.params, **overrides})
