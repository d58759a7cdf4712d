"""The benchmark data model: a :class:`Case` is one shared context and its questions.

A RULER-style case (arXiv:2404.06654) has a single :class:`Turn`; an SCBench-style case
(arXiv:2412.10319) has several turns that all query the same context, so a KV cache built once
for the context can be reused (multi-request) or extended (multi-turn) across them. The
context never contains the questions: a runner appends ``turn.question`` (and primes the reply
with ``turn.answer_prefix``) itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PROMPT_FORMS = ("chat", "raw")


@dataclass
class Turn:
    """One question about a case's context, with its gold answers and how to score them."""

    question: str
    answers: list[str]
    metric: str
    answer_prefix: str = ""
    max_new_tokens: int = 32

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Turn:
        return cls(
            question=str(data["question"]),
            answers=[str(a) for a in data["answers"]],
            metric=str(data["metric"]),
            answer_prefix=str(data.get("answer_prefix", "")),
            max_new_tokens=int(data.get("max_new_tokens", 32)),
        )


@dataclass
class Case:
    """A context plus the turns asked about it.

    ``id`` is stable (``{task}-{target_tokens}-{seed}-{index}`` for generated cases, with
    ``-d{depth}`` when a depth was requested); ``depth`` is the fraction of the context at which
    the asked needle sits, where that is meaningful; ``meta`` holds task-specific details
    (needle positions, parameters, the source record's fields for loaded cases). ``prompt``
    is how the runner sends it: ``chat`` (the model's chat template, the default) or ``raw``
    (``context + question + answer_prefix`` exactly, as RULER sends its records; see
    :mod:`kvlab.bench.raw_prompt`).
    """

    id: str
    task: str
    context: str
    turns: list[Turn]
    target_tokens: int
    depth: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    prompt: str = "chat"

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_FORMS:
            raise ValueError(f"prompt={self.prompt!r}: must be one of {', '.join(PROMPT_FORMS)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``Case.from_dict(case.to_dict()) == case``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        depth = data.get("depth")
        return cls(
            id=str(data["id"]),
            task=str(data["task"]),
            context=str(data["context"]),
            turns=[Turn.from_dict(t) for t in data["turns"]],
            target_tokens=int(data.get("target_tokens", 0)),
            depth=None if depth is None else float(depth),
            meta=dict(data.get("meta") or {}),
            prompt=str(data.get("prompt", "chat")),
        )
