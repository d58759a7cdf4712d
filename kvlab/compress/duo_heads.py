"""DuoAttention's training-free head identification: per-head scores on the synthetic probes
of :mod:`kvlab.compress.duo_probes`, and their cache on disk and in memory (see
:mod:`kvlab.compress.duo_attention`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from kvlab.compress.base import CompressMethod
from kvlab.compress.duo_probes import DEFAULT_PROBE_SET, Probe, family_prompts, parse_probe_set
from kvlab.engine import calibration
from kvlab.engine.context import LayerContext
from kvlab.engine.progress import progress_bar

SCORE_VERSION = 3
"""Version of the score definition and of the probe prompts: part of every cache key
(3: probe families, counted spans)."""
PROBE_ROOM = 64
"""Tokens a probe needs beyond ``sink + recent``: the needles, the question and the answer."""

_SCORES: dict[str, Tensor] = {}  # method:cache key -> scores [layers, kv_heads], for this process


@dataclass(frozen=True)
class Identification:
    """The settings the per-head scores depend on (``length`` already capped for the model;
    ``probe_set`` the families in canonical order, comma-separated)."""

    sink: int
    recent: int
    probes: int
    length: int
    score: str
    probe_set: str = DEFAULT_PROBE_SET


def retrieval_heads(scores: Tensor, share: float) -> Tensor:
    """Boolean ``[layers, kv_heads]``: the ``round(share * heads)`` highest-scored heads of the
    whole model (ties: the earlier layer and head first)."""
    count = round(share * scores.numel())
    order = torch.argsort(-scores.flatten(), stable=True)
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[order[:count]] = True
    return chosen.reshape(scores.shape)


# -- identification -------------------------------------------------------------------------------
def head_scores(engine: Any, settings: Identification) -> Tensor:
    """Per-head scores ``[layers, kv_heads]`` of ``engine``'s model: from this process's memory,
    else from the cache file, else measured (:func:`measure_heads`) and written to both."""
    return cached_head_scores(engine, settings, "duo_attention", measure_heads)


def cached_head_scores(
    engine: Any, settings: Any, method: str, measure: Callable[[Any, Any], Tensor]
) -> Tensor:
    """Per-head scores ``[layers, kv_heads]`` that ``measure(engine, settings)`` gives, kept in
    this process's memory and in ``<kvlab cache dir>/<method>/<model>-<key>.json``, keyed by
    :func:`cache_key` (shared by the methods that calibrate heads: DuoAttention, LycheeDecode)."""
    key = f"{method}:{cache_key(engine, settings)}"
    if key in _SCORES:
        return _SCORES[key]
    path = score_path(engine, key.split(":", 1)[1], method)
    shape = [engine.config.num_hidden_layers, kv_heads_of(engine.config)]
    scores = _read_scores(path, shape)
    if scores is None:
        start = time.perf_counter()
        scores = measure(engine, settings)
        _write_scores(path, engine, settings, scores, time.perf_counter() - start, method)
    _SCORES[key] = scores
    return scores


def cache_key(engine: Any, settings: Any) -> str:
    """Digest of the model (name, configuration, weight fingerprint, dtype) and the settings
    (:func:`kvlab.engine.calibration.cache_key`)."""
    return calibration.cache_key(engine, SCORE_VERSION, dataclasses.asdict(settings))


def score_path(engine: Any, key: str, method: str = "duo_attention") -> Path:
    return calibration.record_path(engine, key, method)


def _read_scores(path: Path, shape: list[int]) -> Tensor | None:
    record = calibration.read_record(path)
    try:
        scores = torch.tensor(record["scores"], dtype=torch.float32)  # type: ignore[index]
    except (ValueError, KeyError, TypeError):
        return None
    return scores if list(scores.shape) == shape else None


def _write_scores(
    path: Path, engine: Any, settings: Any, scores: Tensor, seconds: float, method: str
) -> None:
    calibration.write_record(path, {
        "method": method, "version": SCORE_VERSION, "model": engine.name,
        "settings": dataclasses.asdict(settings), "seconds": round(seconds, 3),
        "scores": scores.tolist(),
    })


def measure_heads(engine: Any, settings: Identification) -> Tensor:
    """Scores ``[layers, kv_heads]``: the mean over probes (:func:`probe_prompts`) of the
    attention mass the answer queries put on the spans the answer needs (``needle``) or outside
    the streaming window (``far``) (:class:`AnswerMass`).
    Each probe runs as the engine's set-up work (:meth:`Engine.probe`: not counted as a
    request, no progress display of its own); this function shows one bar over the probes."""
    from kvlab.recipe import Recipe

    prompts = probe_prompts(engine, settings)
    total = torch.zeros(engine.config.num_hidden_layers, kv_heads_of(engine.config))
    with progress_bar(engine.progress, "prompts") as bar:
        task = bar.add_task(
            f"duo_attention: identifying heads ({settings.probes} x {settings.length} tokens, "
            f"{settings.probe_set})",
            total=len(prompts),
        )
        for probe in prompts:
            if settings.score == "needle":
                counted = AnswerMass(probe.answer, probe.spans)
            else:  # far: what a streaming head drops, seen from each answer query
                counted = AnswerMass(probe.answer, ((settings.sink, len(probe.ids)),), settings.recent)
            sequence = engine.probe(Recipe(compress=counted), probe.ids)
            total += torch.stack(sequence.prepared["compress"])
            bar.advance(task)
    return total / len(prompts)


@dataclass(frozen=True)
class AnswerMass(CompressMethod):
    """Identification probe (not registered): at the end of a probe's prefill, records per KV
    head the attention probability that the last ``answer`` queries put on entries at
    positions ``start <= k < end`` of one of ``spans`` and ``k <= p - recent`` (``p``: the
    query's position; with the one span ``(sink, n)``, that is what a streaming head drops),
    averaged over the answer queries and the KV head's query heads. Keeps every entry (the
    cache is thrown away)."""

    name: ClassVar[str] = "duo_attention.probe"
    paper: ClassVar[str] = "-"
    summary: ClassVar[str] = "DuoAttention's head identification probe."

    answer: int
    spans: tuple[tuple[int, int], ...]
    recent: int = 0

    def prepare(self, engine: Any) -> list[Tensor | None]:
        return [None] * engine.config.num_hidden_layers  # one entry per layer, filled by compress

    def keep(self, q: Tensor, ctx: LayerContext) -> Tensor | None:
        return None

    def compress(self, q: Tensor, ctx: LayerContext) -> None:
        q_pos = ctx.positions[-self.answer :]
        probs = torch.softmax(ctx.logits(q[:, :, -self.answer :], q_pos), dim=-1)  # [1, Hq, a, n]
        k_pos = ctx.layer.key_positions()[None, :]
        inside = torch.zeros_like(k_pos, dtype=torch.bool)
        for start, end in self.spans:
            inside |= (k_pos >= start) & (k_pos < end)
        counted = inside & (k_pos <= q_pos[:, None] - self.recent)
        mass = (probs[0] * counted).sum(dim=-1)  # [Hq, a]
        ctx.prepared["compress"][ctx.index] = mass.reshape(ctx.layer.kv_heads, -1).mean(dim=-1).cpu()


def probe_prompts(engine: Any, settings: Identification) -> list[Probe]:
    """The identification prompts of ``settings`` (:func:`kvlab.compress.duo_probes.probe_prompts`)."""
    return family_prompts(
        engine, parse_probe_set(settings.probe_set), settings.probes, settings.length,
        settings.sink, settings.recent,
    )


def kv_heads_of(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
