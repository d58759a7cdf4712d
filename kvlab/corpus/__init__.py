"""Haystack material: RULER's noise sentences and the shipped public-domain prose corpus.

RULER (arXiv:2404.06654) uses a *noise* haystack (five fixed sentences repeated) and an
*essay* haystack (natural prose, needles inserted at sentence boundaries). kvlab ships its
prose in ``kvlab/corpus/prose.txt`` (chapters 1-29 of Jane Austen's *Pride and Prejudice*,
1813, public domain; see ``README.md`` beside it). Haystacks are lists of *units*, each a sentence
with its trailing separator, so joining units always gives well-formed text; the prose
haystack is measured in words, so it fits a token budget closely.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
HAYSTACKS = ("noise", "prose")
_ABBREVIATIONS = {"mr", "mrs", "dr", "st", "esq", "col", "capt", "ms", "messrs", "sir", "rev"}
_BOUNDARY = re.compile(r"[.!?][\"')]*\s+(?=[\"'(]?[A-Z])")


@cache
def prose_text() -> str:
    """The whole shipped prose corpus (paragraphs separated by blank lines)."""
    return (resources.files("kvlab.corpus") / "prose.txt").read_text(encoding="utf-8")


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph (abbreviations such as ``Mr.`` do not end a sentence)."""
    out: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(paragraph):
        word = re.search(r"(\w+)$", paragraph[start : match.start()])
        if word and word.group(1).lower() in _ABBREVIATIONS:
            continue
        out.append(paragraph[start : match.end()].strip())
        start = match.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


@cache
def prose_units() -> tuple[str, ...]:
    """The corpus as sentence units, each ending in ``" "`` or, at a paragraph end, ``"\\n\\n"``."""
    units: list[str] = []
    for paragraph in prose_text().split("\n\n"):
        sentences = split_sentences(" ".join(paragraph.split()))
        units.extend(s + " " for s in sentences[:-1])
        if sentences:
            units.append(sentences[-1] + "\n\n")
    return tuple(units)


@cache
def prose_words() -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """The corpus as words (each with its trailing separator) and, per word, whether it ends a
    sentence; RULER's essay haystack is likewise cut by words."""
    words: list[str] = []
    ends: list[bool] = []
    for unit in prose_units():
        parts = unit.split(" ")
        if parts and parts[-1] == "":
            parts = parts[:-1]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            words.append(part if last and part.endswith("\n\n") else part + " ")
            ends.append(last)
    return tuple(words), tuple(ends)


@cache
def sentence_starts() -> tuple[int, ...]:
    """Indices into :func:`prose_words` of the words that start a sentence."""
    _, ends = prose_words()
    return (0,) + tuple(i + 1 for i, end in enumerate(ends[:-1]) if end)


@cache
def vocabulary() -> tuple[str, ...]:
    """Sorted distinct all-lowercase words (3-12 letters) of the corpus (~4,000 words)."""
    words = re.findall(r"(?<![\w'-])[a-z]{3,12}(?![\w'-])", prose_text())
    return tuple(sorted(set(words)))


def haystack_units(kind: str, n: int, start: int = 0) -> list[str]:
    """A haystack as sentence units: ``n`` noise sentences, or ``n`` prose words from word
    ``start`` (cycling through the corpus; the last sentence may be cut short)."""
    if kind == "noise":
        return [NOISE[i % len(NOISE)] + " " for i in range(n)]
    if kind != "prose":
        raise ValueError(f"unknown haystack {kind!r}: use one of {', '.join(HAYSTACKS)}")
    words, ends = prose_words()
    size = len(words)
    units: list[str] = []
    current: list[str] = []
    for i in range(start, start + n):
        current.append(words[i % size])
        if ends[i % size]:
            units.append("".join(current))
            current = []
    if current:
        units.append("".join(current))
    return units


def boundary_at(units: list[str], fraction: float) -> int:
    """The unit boundary (0..len(units)) whose character offset is closest to ``fraction``."""
    total = sum(len(u) for u in units)
    goal = fraction * total
    best, best_gap, offset = 0, abs(goal), 0
    for i, unit in enumerate(units, start=1):
        offset += len(unit)
        gap = abs(offset - goal)
        if gap < best_gap:
            best, best_gap = i, gap
        elif offset > goal:
            break
    return best


def weave(units: list[str], inserts: list[tuple[float, str]]) -> str:
    """Join ``units`` with each ``(fraction, sentence)`` inserted at the closest boundary.

    Inserts at the same boundary keep their given order.
    """
    slots: dict[int, list[str]] = {}
    for fraction, sentence in inserts:
        slots.setdefault(boundary_at(units, fraction), []).append(sentence + " ")
    parts: list[str] = []
    for i in range(len(units) + 1):
        parts.extend(slots.get(i, ()))
        if i < len(units):
            parts.append(units[i])
    return "".join(parts).rstrip()
