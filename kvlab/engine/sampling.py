"""Choosing the next token: greedy by default, or temperature / nucleus sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvlab.errors import InputError


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy; otherwise sample from the ``top_p`` nucleus with ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise InputError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p={self.top_p}: must be in (0, 1]")

    def sampler(self, device: torch.device) -> "TokenSampler":
        return TokenSampler(self, device)


class TokenSampler:
    """Stateful sampler (it owns the random generator of one generation)."""

    def __init__(self, sampling: Sampling, device: torch.device) -> None:
        self.sampling = sampling
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator(device=device)
            if sampling.seed is not None:
                self.generator.manual_seed(sampling.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: Tensor) -> int:
        """Next token for ``logits`` ``[vocab]``."""
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > self.sampling.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
