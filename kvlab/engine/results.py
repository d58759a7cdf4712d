"""What the engine measures and returns: :class:`Stats`, :class:`Answer`, :class:`Decoded`,
and the checks of the public API's arguments."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from kvlab.engine.sequence import Sequence
from kvlab.errors import InputError


@dataclass
class Stats:
    """Measured numbers of one answer (nothing here is estimated).

    - ``prompt_tokens``: tokens before the answer (context, earlier turns, question);
    - ``prefilled_tokens``: tokens this call ran through the model's prefill;
    - ``new_tokens``: generated tokens;
    - ``kv_tokens``: cache entries per layer and KV head when the answer ended (mean over
      layers, and over KV heads where heads hold different counts);
    - ``kv_bytes``: bytes of every tensor the cache held then on the accelerator (all layers);
    - ``kv_offloaded_bytes``: bytes it held on the offloaded tier (host memory: e.g. ShadowKV's
      values), not in ``kv_bytes``; 0 for methods that offload nothing;
    - ``prefill_s`` / ``decode_s``: wall-clock seconds of the prefill and of the decoding;
    - ``prefilled_per_layer``: tokens each layer ran in that prefill (a token-selective prefill
      method runs fewer through later layers, or probes the first layers first);
    - ``attended_pairs_per_layer``: query-key pairs each layer's attention computed in that
      prefill, summed over query heads (dense causal attention: ``heads x n (n + 1) / 2``; a
      sparse prefill pattern computes fewer).
    """

    prompt_tokens: int
    prefilled_tokens: int
    new_tokens: int
    kv_tokens: float
    kv_bytes: int
    prefill_s: float
    decode_s: float
    kv_offloaded_bytes: int = 0
    prefilled_per_layer: list[int] = field(default_factory=list)
    attended_pairs_per_layer: list[int] = field(default_factory=list)

    @property
    def decode_s_per_token(self) -> float:
        return self.decode_s / self.new_tokens if self.new_tokens else 0.0

    @classmethod
    def measure(
        cls, sequence: Sequence, prompt_tokens: int, prefilled_tokens: int, prefill_s: float,
        decoded: Decoded | None = None,
    ) -> Stats:
        """The stats of ``sequence`` as it stands now, after a prefill of ``prefilled_tokens``
        that took ``prefill_s`` seconds and, when given, the decoding ``decoded``."""
        return cls(
            prompt_tokens=prompt_tokens,
            prefilled_tokens=prefilled_tokens,
            new_tokens=len(decoded.tokens) if decoded else 0,
            kv_tokens=sequence.mean_entries(),
            kv_bytes=sequence.nbytes(),
            prefill_s=prefill_s,
            decode_s=decoded.seconds if decoded else 0.0,
            kv_offloaded_bytes=sequence.offloaded_nbytes(),
            prefilled_per_layer=list(sequence.layer_tokens),
            attended_pairs_per_layer=list(sequence.layer_pairs),
        )

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
class Decoded:
    """What :meth:`Engine.decode` generated: token ids, wall-clock seconds, and (when asked
    for) the log-softmax ``[vocab]`` of each distribution a token was drawn from."""

    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    logprobs: list[Tensor] = field(default_factory=list)


def check_text(value: Any, what: str) -> str:
    """``value`` as a non-empty string; an :class:`InputError` naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise InputError(f"{what}={_short_repr(value)}: must be a string (text), got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"the {what} is empty")
    return value


def check_max_new_tokens(value: Any, allow_zero: bool = False) -> int:
    """``value`` as a count of tokens to generate: an integer >= 1 (>= 0 with ``allow_zero``)."""
    least = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"max_new_tokens={value!r}: must be an integer >= {least}")
    return value


def _short_repr(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."



__all__ = ["Answer", "Counters", "Decoded", "Stats", "check_max_new_tokens", "check_text"]
