"""Perplexity by position: token-level negative log-likelihood of long prose, per position bin.

The measurement of issue 11's context-extension methods, as their papers measure them
(PI, arXiv:2306.15595 §3.2; YaRN, arXiv:2309.00071 §4.3.1; Self-Extend, arXiv:2401.01325
§4.1: perplexity of long documents as a function of the context length). A document of
``length`` tokens is cut from the shipped public-domain prose (:mod:`kvlab.corpus`: *Pride
and Prejudice*, ~70k tokens, so a 32k document fits twice), and run through the engine with a
recipe, chunk by chunk, teacher-forced: the logits of each chunk give the NLL of the tokens
that follow its tokens, so neither an ``n x n`` attention matrix nor ``[n, vocab]`` logits are
ever held (memory grows with the chunk, and with the cache). Token ``p`` (``1 <= p < n``) is
scored by ``-log P(x_p | x_<p)`` and counted in bin ``p // bin_size``; a bin's perplexity is
``exp(sum NLL / tokens)``. ``full`` (no position method) is the baseline that blows up past
the model's window.

How a recipe's other stages act: the document but its last bin is the *context*, prefilled as
a context (phases ``CONTEXT`` ... ``CONTEXT_END``: a compress method observes it and compresses
it after its last chunk, a quantize method converts it), and the last bin is *appended* to that
cache (``APPEND``) and scored there. So the bins before the last measure the recipe's
attention over the whole cache, and the last bin measures reading from the compressed cache:
``yarn(factor=2) + snapkv(budget=0.25)`` scores the last 1k tokens of a 16k document against a
quarter of the first 15k. Without a compress or quantize method the split changes nothing
(chunking does not change the NLL, :func:`document_nll` is exact up to float rounding).
Retrieve methods that act only while decoding change nothing here (no token is decoded).
Prefill methods that drop prompt tokens (``gemfilter``, ``fastkv``) are refused: they leave no
logits for the dropped tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlab.bench.lengths import describe_length, format_length
from kvlab.corpus import prose_text
from kvlab.engine.context import Phase
from kvlab.engine.engine import Engine
from kvlab.engine.progress import progress_bar
from kvlab.errors import InputError, RecipeError
from kvlab.prefill.base import PrefillMethod
from kvlab.recipe import Recipe, parse_recipe

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)
"""4k, 8k (the default model's window), 16k and 32k: in the window, at it, 2x and 4x past it."""
DEFAULT_BIN = 1024
DEFAULT_CHUNK = 1024
MAX_LENGTH = 1024 * 1024


@dataclass(frozen=True)
class BinNLL:
    """The NLL of the tokens at positions ``start <= p < end`` of one document (nats)."""

    start: int
    end: int
    tokens: int
    nll_sum: float

    @property
    def nll(self) -> float:
        """Mean NLL per token, nats."""
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def check_lengths(lengths: list[int] | tuple[int, ...], bin_size: int) -> None:
    """Refuse lengths that are not whole numbers of bins, or out of range, naming the value."""
    if not isinstance(bin_size, int) or isinstance(bin_size, bool) or bin_size < 2:
        raise InputError(f"bin size {bin_size!r}: must be an integer >= 2 (tokens per position bin)")
    if not lengths:
        raise InputError("lengths: give at least one document length, e.g. 4k,8k,16k")
    for length in lengths:
        if not isinstance(length, int) or isinstance(length, bool) or length < 2 * bin_size:
            raise InputError(
                f"length {length!r}: must be an integer of at least two bins (>= {2 * bin_size} "
                f"tokens with bin size {bin_size})"
            )
        if length > MAX_LENGTH:
            raise InputError(f"length {describe_length(length)}: at most {describe_length(MAX_LENGTH)} tokens")
        if length % bin_size:
            raise InputError(
                f"length {describe_length(length)}: must be a multiple of the bin size "
                f"{bin_size} (bins partition the document), e.g. {length // bin_size * bin_size}"
            )


def check_recipe(recipe: Recipe) -> None:
    """Refuse a recipe whose prefill drops prompt tokens: they would have no logits to score."""
    method = recipe.prefill
    if method is not None and (
        method.whole_context or type(method).select_tokens is not PrefillMethod.select_tokens
    ):
        raise RecipeError(
            f"perplexity of '{recipe}': {method.name} drops prompt tokens in prefill, so some "
            "tokens get no logits to score; use a prefill method that keeps every token "
            "(ashape, tri_shape, vertical_slash, block_sparse, sale) or none"
        )


@cache
def _corpus_ids(tokenizer: Any) -> tuple[int, ...]:
    return tuple(tokenizer(prose_text(), add_special_tokens=False)["input_ids"])


def corpus_tokens(tokenizer: Any) -> int:
    """Tokens of the shipped prose corpus with ``tokenizer``."""
    return len(_corpus_ids(tokenizer))


def document(tokenizer: Any, length: int, start: int = 0) -> list[int]:
    """``length`` tokens of the shipped prose from token ``start`` (no special tokens, no
    template: plain running text). Refused when the corpus is shorter."""
    ids = _corpus_ids(tokenizer)
    if start < 0 or start + length > len(ids):
        raise InputError(
            f"a document of {describe_length(length)} tokens from token {start} needs "
            f"{start + length} tokens; the shipped prose is {len(ids)} tokens with this tokenizer "
            f"(use a shorter length or an earlier start)"
        )
    return list(ids[start : start + length])


def bins_of(nll: Tensor, bin_size: int) -> list[BinNLL]:
    """Bin the NLL ``[n - 1]`` of tokens ``1 .. n-1`` by position (token ``p`` in bin
    ``p // bin_size``): the bins partition the scored tokens. Sums in float64."""
    n = nll.numel() + 1
    positions = torch.arange(1, n)
    out = []
    for start in range(0, n, bin_size):
        end = min(start + bin_size, n)
        mask = (positions >= start) & (positions < end)
        out.append(BinNLL(start, end, int(mask.sum()), float(nll[mask].double().sum())))
    return out


def document_nll(
    engine: Engine, recipe: Recipe | str | None, ids: list[int], chunk: int = DEFAULT_CHUNK,
    tail: int | None = None, progress: bool | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Tensor:
    """NLL ``[len(ids) - 1]`` (float32, nats) of tokens ``1 .. n-1`` of ``ids``, teacher-forced
    through ``recipe`` in chunks of ``chunk`` tokens (see the module docstring): the first
    ``n - tail`` tokens are the recipe's context (compressed after its last chunk), the last
    ``tail`` (default ``chunk``) are appended to that cache. ``on_chunk(tokens)`` is called
    after each chunk."""
    parsed = parse_recipe(recipe)
    check_recipe(parsed)
    n = len(ids)
    if n < 2:
        raise InputError(f"a document of {n} tokens has no token to score; give at least 2")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise InputError(f"chunk {chunk!r}: must be an integer >= 1 (tokens per forward)")
    tail = chunk if tail is None else tail
    if not 0 <= tail < n:
        raise InputError(f"tail {tail}: must be in [0, {n - 1}] for a document of {n} tokens")
    sequence = engine.new_sequence(parsed)
    context = n - tail
    bounds = [(a, b, Phase.CONTEXT) for a, b in engine.chunks(context, chunk)]
    a, b, _ = bounds[-1]
    bounds[-1] = (a, b, Phase.CONTEXT_END)
    bounds += [(s, min(s + chunk, n), Phase.APPEND) for s in range(context, n, chunk)]
    nll = torch.empty(n - 1)
    show = engine.progress if progress is None else progress
    with progress_bar(show and len(bounds) > 2) as bar:
        task = bar.add_task(f"perplexity {describe_length(n)} '{parsed}'", total=n)
        for a, b, phase in bounds:
            logits = engine.forward_logits(sequence, ids[a:b], phase)  # [b - a, vocab]
            targets = torch.tensor(ids[a + 1 : b + 1], device=logits.device)
            rows = targets.numel()  # the document's last token predicts nothing
            nll[a : a + rows] = F.cross_entropy(logits[:rows], targets, reduction="none").cpu()
            del logits
            bar.update(task, advance=b - a)
            if on_chunk is not None:
                on_chunk(b - a)
    return nll


def settings_id(model: str, dtype: str, start: int, bin_size: int) -> str:
    """Hash of what changes a perplexity row besides the recipe and the length."""
    key = json.dumps({"model": model, "dtype": dtype, "start": start, "bin": bin_size}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def perplexity_rows(
    engine: Engine, recipe: str, length: int, bin_size: int = DEFAULT_BIN,
    chunk: int = DEFAULT_CHUNK, start: int = 0, progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Measure one (recipe, length) document: one row per position bin, with the columns of
    the store's ``perplexity`` table (:data:`kvlab.bench.store.PPL_COLUMNS`)."""
    check_lengths([length], bin_size)
    parsed = parse_recipe(recipe)
    ids = document(engine.tokenizer, length, start)
    began = time.perf_counter()
    nll = document_nll(engine, parsed, ids, chunk=chunk, tail=bin_size, progress=progress)
    seconds = time.perf_counter() - began
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    sid = settings_id(engine.name, dtype, start, bin_size)
    load = os.getloadavg()[0]
    return [
        {
            "settings_id": sid, "model": engine.name, "device": str(engine.device), "dtype": dtype,
            "threads": torch.get_num_threads(), "recipe": str(parsed), "recipe_label": recipe,
            "context_window": engine.context_window(parsed), "length": length, "doc_start": start,
            "bin_start": b.start, "bin_end": b.end, "tokens": b.tokens, "nll_sum": b.nll_sum,
            "nll": b.nll, "perplexity": b.perplexity, "seconds": seconds,
            "load_average": load,
        }
        for b in bins_of(nll, bin_size)
    ]


def run_perplexity(
    engine: Engine, recipes: list[str], lengths: list[int], store: Any,
    bin_size: int = DEFAULT_BIN, chunk: int = DEFAULT_CHUNK, start: int = 0,
    say: Callable[[str], None] = print,
) -> int:
    """Measure every (recipe, length) not yet in ``store`` (a
    :class:`~kvlab.bench.store.ResultStore`), longest last; each finished document's rows are
    written at once, so an interrupted run resumes. Returns the documents measured."""
    check_lengths(lengths, bin_size)
    parsed = [(label, parse_recipe(label)) for label in recipes]
    for _, recipe in parsed:
        check_recipe(recipe)
    for length in lengths:
        document(engine.tokenizer, length, start)  # refuse a too-short corpus before any run
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    sid = settings_id(engine.name, dtype, start, bin_size)
    done = store.perplexity_done(sid)
    measured = 0
    for length in sorted(lengths):
        for label, recipe in parsed:
            if (str(recipe), length) in done:
                say(f"{format_length(length)} '{label}': already stored, skipped")
                continue
            rows = perplexity_rows(engine, label, length, bin_size, chunk, start)
            store.add_perplexity(rows)
            done.add((str(recipe), length))
            measured += 1
            inside = [r for r in rows if r["bin_end"] <= min(r["context_window"], length)]
            last = rows[-1]
            say(
                f"{format_length(length)} '{label}': last bin ppl {last['perplexity']:.2f}"
                + (f", bins in the window {min(r['perplexity'] for r in inside):.2f}-"
                   f"{max(r['perplexity'] for r in inside):.2f}" if inside else "")
                + f" ({rows[0]['seconds']:.0f} s, load {rows[0]['load_average']:.1f})"
            )
    return measured


__all__ = [
    "BinNLL", "DEFAULT_BIN", "DEFAULT_CHUNK", "DEFAULT_LENGTHS", "bins_of", "check_lengths",
    "check_recipe", "corpus_tokens", "document", "document_nll", "perplexity_rows",
    "run_perplexity", "settings_id",
]
