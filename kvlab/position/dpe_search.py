"""DPE's calibration: the needle sweep that finds each dimension group's scale, kept per model.

Lu et al., "Effective Length Extrapolation via Dimension-Wise Positional Embeddings
Manipulation", 2025, arXiv:2504.18857, step (a) "detecting the effective relative distance"
(reference code: github.com/LuLuLuyi/DPE, ``effective_length_detection/run_niah_detect.sh``):
at the target length ``L`` (trained length ``L0``), every group but one is held at the scale
``2 L / L0`` while the one group ``g`` takes each candidate scale ``s`` in
``1, 2, 4, ...`` with ``L / s >= W`` (the reference: ``L / s`` from ``L`` down to 1024, its
window); a needle-in-a-haystack test scores each setting, and group ``g`` keeps the scale of
its best score. One group at a time, ``groups x candidates`` settings in all.

The needle test is kvlab's probe set (:mod:`kvlab.compress.duo_probes`, the probes
DuoAttention's head identification uses: ``passkey`` digits, ``words``, ``multikey`` with
distractors, ``multihop``; random-token analogues without a tokenizer), every needle at least
``W`` tokens before the question, so the answer must come through the scaled far pass. A
setting's score is the share of probes whose answer tokens are each the most likely token
when the answer is teacher-forced (what greedy decoding would write: the paper's needle
accuracy, from one prefill and ``answer - 1`` decoding steps), ties broken by the mean
log-probability of the answer tokens (``nats``), then by the smaller scale.

Different from the reference: kvlab's probes (the paper uses 4-needle NIAH on Paul Graham
essays, scored by generated text); no key-dimension selection (the paper's optional top-48
dimensions by query-key norm is not built: every pair of a group takes its scale).

Cost: ``groups x candidates x probes`` prefills of ``L`` tokens with DPE's multi-pass attention
(one progress bar over them). The result is written to
``<kvlab cache dir>/dpe/<model>-<key>.json`` (:mod:`kvlab.engine.calibration`: keyed by the
model's name, configuration, weight fingerprint and dtype), one entry per search setting;
``dpe(scales=calibrated, window=W)`` takes the entry of window ``W`` with the longest length
(then the most probes).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlab.compress.duo_heads import PROBE_ROOM
from kvlab.compress.duo_probes import DEFAULT_PROBE_SET, Probe, family_prompts, parse_probe_set
from kvlab.engine import calibration
from kvlab.engine.progress import progress_bar
from kvlab.errors import RecipeError

SEARCH_VERSION = 1
"""Version of the search and its score: part of the cache key (files of another version are
not read)."""
METHOD = "dpe"

_CALIBRATED: dict[str, dict[str, Any]] = {}  # cache key -> the model's record, for this process


@dataclass(frozen=True)
class Search:
    """The settings of one search: target ``length``, neighbour ``window`` (DPE's ``W``),
    ``groups`` of RoPE dimension pairs, ``probes`` prompts of the families of ``probe_set``,
    the ``candidates`` scales tried per group and the ``held`` scale of the other groups."""

    length: int
    window: int
    groups: int
    probes: int
    probe_set: str
    candidates: tuple[int, ...]
    held: int


@dataclass(frozen=True)
class Score:
    """A setting's needle score: ``accuracy`` (share of probes answered, in [0, 1]) and
    ``logprob`` (mean log-probability of the answer tokens, nats)."""

    accuracy: float
    logprob: float


@dataclass(frozen=True)
class Calibration:
    """A search's result: the chosen ``scales`` (one per group, fastest first), every
    setting's score in ``table`` (group, scale, accuracy, logprob), and the ``seconds`` it took."""

    search: Search
    scales: tuple[int, ...]
    table: tuple[dict[str, Any], ...]
    seconds: float


def candidate_scales(length: int, window: int) -> tuple[int, ...]:
    """``1, 2, 4, ...`` while ``length / s >= window`` (the reference's detecting factors)."""
    scales, s = [], 1
    while length // s >= window:
        scales.append(s)
        s *= 2
    return tuple(scales) or (1,)


def search_settings(
    engine: Any, length: int, window: int = 1024, groups: int = 8, probes: int = 4,
    probe_set: str = DEFAULT_PROBE_SET, candidates: tuple[int, ...] | None = None,
    held: int | None = None,
) -> Search:
    """The :class:`Search` of these settings on ``engine``'s model, checked: ``groups`` must
    divide the model's RoPE dimension pairs, the probes must fit their needles ``window``
    tokens before the question. Defaults: the paper's candidates and ``held = 2 L / L0``."""
    pairs = _pairs(engine.config)
    if groups < 1 or pairs % groups:
        raise RecipeError(f"dpe calibration groups={groups}: must divide the model's {pairs} RoPE dimension pairs")
    if window < 1 or probes < 1:
        raise RecipeError(f"dpe calibration: window ({window}) and probes ({probes}) must be >= 1")
    if length < window + PROBE_ROOM:
        raise RecipeError(
            f"dpe calibration length={length}: a probe needs its needles at least window={window} "
            f"tokens before the question, so length >= window + {PROBE_ROOM} = {window + PROBE_ROOM}"
        )
    families = ",".join(parse_probe_set(probe_set))
    chosen = candidate_scales(length, window) if candidates is None else tuple(candidates)
    if not chosen or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in chosen):
        raise RecipeError(f"dpe calibration candidates={list(chosen)}: give integers >= 1")
    if held is None:
        held = max(1, 2 * length // engine.trained_length)
    return Search(length, window, groups, probes, families, tuple(sorted(set(chosen))), held)


def search_scales(
    search: Search, evaluate: Callable[[tuple[int, ...]], Score],
    on_setting: Callable[[], None] | None = None,
) -> tuple[tuple[int, ...], tuple[dict[str, Any], ...]]:
    """The paper's sweep: for each group, every candidate scale with the other groups at
    ``search.held``, scored by ``evaluate(scales)``; each group keeps its best candidate
    (higher accuracy, then higher log-probability, then the smaller scale). Returns the scales
    and the table of every setting."""
    chosen, table = [], []
    for group in range(search.groups):
        best: tuple[float, float, int] | None = None
        for scale in search.candidates:
            scales = [search.held] * search.groups
            scales[group] = scale
            score = evaluate(tuple(scales))
            table.append({"group": group, "scale": scale, "accuracy": score.accuracy, "logprob": score.logprob})
            rank = (score.accuracy, score.logprob, -scale)
            if best is None or rank > best:
                best = rank
            if on_setting is not None:
                on_setting()
        assert best is not None
        chosen.append(-best[2])
    return tuple(chosen), tuple(table)


def probe_prompts(engine: Any, search: Search) -> list[Probe]:
    """The needle prompts: ``search.probes`` probes of ``search.length`` tokens, every needle
    at least ``search.window`` tokens before the first answer query."""
    try:
        return family_prompts(engine, parse_probe_set(search.probe_set), search.probes, search.length, 0, search.window)
    except RecipeError:  # the probes' own message speaks of DuoAttention's streaming window
        raise RecipeError(
            f"dpe calibration length={search.length}: a probe of the families {search.probe_set} "
            f"cannot put its needles window={search.window} tokens before its question on this "
            "model (its prompt template and question take the rest); raise --length or lower --window"
        ) from None


def needle_score(engine: Any, probes: list[Probe], scales: tuple[int, ...], window: int,
                 on_probe: Callable[[], None] | None = None) -> Score:
    """Accuracy and mean answer log-probability of ``dpe(scales, window)`` on ``probes``: each
    probe's context prefilled up to its answer, the answer teacher-forced."""
    from kvlab.recipe import parse_recipe

    recipe = parse_recipe(f"dpe(scales={list(scales)}, window={window})")
    found, logprob = 0, 0.0
    for probe in probes:
        fed = len(probe.ids) - (probe.answer - 1)
        sequence = engine.new_sequence(recipe)
        logits = engine.prefill(sequence, probe.ids[:fed], compress=True, progress=False)
        rows = engine.teacher_force(sequence, logits, list(probe.targets))  # [answer, vocab]
        targets = torch.tensor(probe.targets, device=rows.device)[:, None]
        found += int(bool((rows.argmax(dim=-1) == targets[:, 0]).all()))
        logprob += float(rows.gather(1, targets).mean())
        if on_probe is not None:
            on_probe()
    return Score(found / len(probes), logprob / len(probes))


def calibrate(engine: Any, search: Search) -> Calibration:
    """Run the sweep of ``search`` on ``engine``'s model (one progress bar over its probes) and
    store the result in the model's calibration file (replacing an entry of the same settings)."""
    probes = probe_prompts(engine, search)
    start = time.perf_counter()
    total = search.groups * len(search.candidates) * len(probes)
    with progress_bar(engine.progress, "probes") as bar:
        task = bar.add_task(
            f"dpe: calibrating {search.groups} group scales ({len(search.candidates)} candidates x "
            f"{len(probes)} probes of {search.length} tokens, {search.probe_set})", total=total,
        )
        scales, table = search_scales(
            search, lambda s: needle_score(engine, probes, s, search.window, lambda: bar.advance(task)),
        )
    result = Calibration(search, scales, table, round(time.perf_counter() - start, 3))
    store(engine, result)
    return result


# -- on disk ----------------------------------------------------------------------------------
def calibration_path(engine: Any) -> Path:
    """The model's calibration file."""
    return calibration.record_path(engine, _model_key(engine), METHOD)


def store(engine: Any, result: Calibration) -> Path:
    """Add ``result`` to the model's calibration file (an entry of the same settings is replaced)."""
    path = calibration_path(engine)
    record = _record(engine) or _empty(engine)
    settings = dataclasses.asdict(result.search)
    entries = [e for e in record["calibrations"] if e.get("search") != settings]
    entries.append({"search": settings, "scales": list(result.scales), "seconds": result.seconds,
                    "table": list(result.table)})
    record["calibrations"] = entries
    calibration.write_record(path, record)
    _CALIBRATED[_model_key(engine)] = record
    return path


def calibrations(engine: Any) -> list[Calibration]:
    """Every calibration stored for ``engine``'s model."""
    record = _record(engine)
    found = []
    for entry in (record or {}).get("calibrations", []):
        search = entry["search"]
        search = Search(**{**search, "candidates": tuple(search["candidates"])})
        found.append(Calibration(search, tuple(entry["scales"]), tuple(entry["table"]), entry["seconds"]))
    return found


def calibrated_scales(engine: Any, window: int) -> tuple[int, ...]:
    """The scales calibrated on ``engine``'s model with neighbour window ``window`` (of the
    longest length, then the most probes); a :class:`RecipeError` naming the command to run
    when there are none."""
    fitting = [c for c in calibrations(engine) if c.search.window == window]
    if not fitting:
        others = sorted({c.search.window for c in calibrations(engine)})
        elsewhere = f" (it has calibrations for window {', '.join(map(str, others))})" if others else ""
        raise RecipeError(
            f"dpe(scales=calibrated, window={window}): no DPE calibration of {engine.name} with "
            f"window {window} in {calibration_path(engine)}{elsewhere}; run "
            f"'kvlab calibrate dpe --window {window}' (with --model for another model) first, or "
            "give the scales, e.g. dpe(scales=[2, 8, 2, 8, 32, 32, 32, 4])"
        )
    best = max(fitting, key=lambda c: (c.search.length, c.search.probes))
    return best.scales


def _record(engine: Any) -> dict[str, Any] | None:
    """The model's calibration record: from this process's memory, else its file; a file
    made for another model (its key differs) is refused."""
    key = _model_key(engine)
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    path = calibration_path(engine)
    record = calibration.read_record(path)
    if record is None:
        return None
    if record.get("key") != key or not isinstance(record.get("calibrations"), list):
        raise RecipeError(
            f"{path} is not a DPE calibration of {engine.name} as loaded (it was made for "
            f"{record.get('model')!r}, key {record.get('key')!r}); delete it and run "
            "'kvlab calibrate dpe' again"
        )
    _CALIBRATED[key] = record
    return record


def _empty(engine: Any) -> dict[str, Any]:
    return {"method": METHOD, "version": SEARCH_VERSION, "model": engine.name,
            "key": _model_key(engine), "calibrations": []}


def _model_key(engine: Any) -> str:
    return calibration.cache_key(engine, SEARCH_VERSION, None)


def _pairs(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim) // 2


__all__ = [
    "Calibration", "Score", "Search", "calibrate", "calibrated_scales", "calibration_path",
    "calibrations", "candidate_scales", "needle_score", "search_scales", "search_settings", "store",
]
