"""DuoAttention's identification probes: synthetic prompts whose answer lies far back.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads", ICLR 2025, arXiv:2410.10819, find their retrieval heads on synthetic long texts with
several passkeys inserted. kvlab scores its heads on probes of four *families*, chosen by
``duo_attention(probe_set=...)`` (a comma-separated list; the default mixes all four):

- ``passkey``: "The pass key is 71432. Remember it. 71432 is the pass key." (digits);
- ``words``: a person's pet, "Clara keeps a pet otter. ..." (a word as the answer);
- ``multikey``: four coloured boxes with five-digit keys, one box asked (three distractors);
- ``multihop``: "Clara lives in the red house." and, elsewhere, "The red house has a heron on
  its door."; asked which animal is on the door of Clara's house (two hops, a word answer).

Each probe is prose filler (the shipped corpus, :mod:`kvlab.corpus`) with the needles at fixed
depths, the chat-formatted question at the end and the answer teacher-forced: the last
``answer`` queries predict the answer's tokens. The *counted* spans are the needles the answer
needs (the asked needle; both hops for ``multihop``; never a distractor). Every needle lies
before the streaming window of the first answer query and after the sinks. Probe ``k`` of
``probes`` belongs to family ``k mod len(families)`` (in the order of :data:`PROBE_FAMILIES`)
and puts its answer needle at depth ``(k + 1/2) / probes``. Without a tokenizer (tiny random
test models) each family has a random-token analogue of the same shape (see
:func:`_random_parts`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from kvlab.errors import RecipeError

PROBE_FAMILIES = ("passkey", "words", "multikey", "multihop")
"""The probe families, in the order probes cycle through them."""
DEFAULT_PROBE_SET = ",".join(PROBE_FAMILIES)
RANDOM_NEEDLE = 8
"""Tokens of the passkey needle of tokenizer-less probes (repeated at the end as the answer)."""

NAMES = (
    "Clara", "Hugo", "Ingrid", "Tobias", "Mira", "Oskar", "Greta", "Felix", "Nadia", "Rafael",
    "Selma", "Viktor", "Lena", "Anton", "Petra", "Jonas",
)
ANIMALS = (
    "otter", "heron", "badger", "falcon", "walrus", "lizard", "beaver", "parrot", "turtle",
    "rabbit", "penguin", "squirrel", "dolphin", "hamster", "raccoon", "camel",
)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "white")
_HAYSTACK = "KVLAB_DUO_HAYSTACK"


def parse_probe_set(text: Any) -> tuple[str, ...]:
    """The families named by ``text`` (comma-separated), in :data:`PROBE_FAMILIES` order."""
    allowed = ", ".join(PROBE_FAMILIES)
    where = f"duo_attention(probe_set={text!r})"
    if not isinstance(text, str):
        raise RecipeError(f"{where}: must be a comma-separated list of {allowed}")
    names = [part.strip() for part in text.split(",")]
    if not any(names):
        raise RecipeError(f"{where}: name at least one probe family of {allowed}")
    for name in names:
        if name not in PROBE_FAMILIES:
            raise RecipeError(f"{where}: unknown probe family {name!r}; use a comma-separated list of {allowed}")
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: a probe family is named twice; name each of {allowed} at most once")
    return tuple(f for f in PROBE_FAMILIES if f in names)


@dataclass(frozen=True)
class Probe:
    """One identification prompt: ``ids``, whose last ``answer`` queries predict the answer
    (teacher-forced); ``needle``: the (start, end) token positions of the needle holding the
    answer; ``spans``: every span the answer needs (``needle`` included), the entries the
    ``needle`` score counts; ``expected``: the answer text (empty for random probes);
    ``targets``: the ``answer`` tokens those queries predict (``ids`` holds all but the last)."""

    family: str
    ids: list[int]
    answer: int
    needle: tuple[int, int]
    spans: tuple[tuple[int, int], ...]
    expected: str = ""
    targets: tuple[int, ...] = ()


@dataclass
class _Needle:
    ids: list[int]
    depth: float  # in [0, 1]: where it sits between the earliest and the latest allowed place
    counted: bool
    holds_answer: bool = False


def family_prompts(
    engine: Any, families: tuple[str, ...], count: int, length: int, sink: int, recent: int
) -> list[Probe]:
    """``count`` probes of ``length`` tokens cycling through ``families``."""
    prompts = []
    for k in range(count):
        family = families[k % len(families)]
        depth = (k + 0.5) / count
        if engine.format is not None:
            parts = _text_parts(engine.format, family, k, depth, length)
        else:
            parts = _random_parts(engine.config.vocab_size, family, k, depth, length)
        prompts.append(_assemble(family, *parts, length=length, sink=sink, recent=recent))
    return prompts


def _assemble(family: str, head: list[int], needles: list[_Needle], tail: list[int], answer: int,
              filler: list[int], expected: str, targets: list[int], *, length: int, sink: int,
              recent: int) -> Probe:
    """``head``, filler with ``needles`` woven in by depth, ``tail``: exactly ``length`` tokens.
    Every needle starts at or after ``max(sink, len(head))`` and ends before the streaming
    window of the first answer query (position ``length - answer``) and before the tail."""
    needles = sorted(needles, key=lambda n: n.depth)  # stable: equal depths keep their order
    size = sum(len(n.ids) for n in needles)
    earliest = max(sink, len(head)) - len(head)  # filler before the first needle, at least
    latest = min(length - answer - recent + 1, length - len(tail)) - len(head) - size  # at most
    room = length - len(head) - size - len(tail)  # filler tokens in all
    if latest < earliest or room < 0 or len(filler) < room:
        raise RecipeError(
            f"duo_attention: a {length}-token {family} probe cannot hold its needles outside the "
            f"streaming window (sink {sink}, recent {recent}); raise probe_length or lower "
            "sink/recent"
        )
    ids, spans, needle, used = list(head), [], (0, 0), 0
    for n in needles:
        before = earliest + round(n.depth * (latest - earliest))
        ids += filler[used:before]
        used = before
        span = (len(ids), len(ids) + len(n.ids))
        ids += n.ids
        if n.counted:
            spans.append(span)
        if n.holds_answer:
            needle = span
    ids += filler[used:room] + tail
    return Probe(family, ids, answer, needle, tuple(spans), expected, tuple(targets))


# -- text probes -----------------------------------------------------------------------------------
def _facts(family: str, k: int, depth: float) -> tuple[str, str, str, list[tuple[str, float, bool, bool]]]:
    """(question, answer prefix, answer, needles as (text, depth, counted, holds answer))."""
    if family == "passkey":  # the probe of kvlab's first identification, unchanged
        key = str(random.Random(k).randint(10_000, 99_999))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        return "What is the pass key?", "The pass key is ", key, [(needle, depth, True, True)]
    rng = random.Random(f"kvlab.duo_probes|{family}|{k}")
    if family == "words":
        name, pet = rng.choice(NAMES), rng.choice(ANIMALS)
        needle = f" {name} keeps a pet {pet}. Remember it: the pet of {name} is a {pet}. "
        return f"What pet does {name} keep?", f"{name} keeps a pet ", pet, [(needle, depth, True, True)]
    if family == "multikey":
        colours = rng.sample(COLOURS, 4)
        keys = [str(n) for n in rng.sample(range(10_000, 100_000), 4)]
        asked = colours[0]
        needles = [(f" The pass key of the {asked} box is {keys[0]}. ", depth, True, True)]
        needles += [(f" The pass key of the {c} box is {key}. ", round(rng.random(), 3), False, False)
                    for c, key in zip(colours[1:], keys[1:])]
        return (f"What is the pass key of the {asked} box?", f"The pass key of the {asked} box is ",
                keys[0], needles)
    if family == "multihop":
        name, colour, pet = rng.choice(NAMES), rng.choice(COLOURS), rng.choice(ANIMALS)
        link = round(rng.uniform(0.0, depth), 3)  # the first hop comes first
        needles = [(f" {name} lives in the {colour} house. ", link, True, False),
                   (f" The {colour} house has a {pet} on its door. ", depth, True, True)]
        return (f"Which animal is on the door of the house {name} lives in?",
                f"The door of {name}'s house has a ", pet, needles)
    raise ValueError(f"unknown probe family {family!r}")


def _text_parts(fmt: Any, family: str, k: int, depth: float, length: int):
    """The pieces of a text probe: the chat-formatted question at the end, the answer fed but
    its last token."""
    from kvlab.corpus import haystack_units

    question, prefix, answer, facts = _facts(family, k, depth)
    rendered = fmt.render([{"role": "user", "content": f"{_HAYSTACK}\n\n{question}"}], answer_prefix=prefix)
    before, after = rendered.split(_HAYSTACK)
    head = fmt.encode(before, first=True)
    needles = [_Needle(fmt.encode(text, first=False), d, counted, holds)
               for text, d, counted, holds in facts]
    asked, answered = fmt.encode(after, first=False), fmt.encode(after + answer, first=False)
    common = 0
    while common < len(asked) and asked[common] == answered[common]:
        common += 1
    filler: list[int] = []
    offset = k * 10_007  # a different stretch of the prose for each probe
    while len(filler) < length:
        filler += fmt.encode("".join(haystack_units("prose", length, offset)), first=False)
        offset += length
    return head, needles, answered[:-1], len(answered) - common, filler, answer, answered[common:]


def _random_parts(vocab: int, family: str, k: int, depth: float, length: int):
    """Random-token analogues: ``passkey`` an 8-token needle repeated at the end; ``words`` a
    2-token key then a 2-token value, the key and value repeated; ``multikey`` four (2-token
    key, 4-token value) needles, one key and its value repeated; ``multihop`` (key A, value V)
    and (key B, A) needles, then B, A, V (the answer A V)."""
    index = PROBE_FAMILIES.index(family)
    g = torch.Generator().manual_seed(k if index == 0 else 1_000_003 * index + k)

    def draw(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    if family == "passkey":
        needle = draw(RANDOM_NEEDLE)
        filler = draw(length)
        return [], [_Needle(needle, depth, True, True)], needle[:-1], RANDOM_NEEDLE, filler, "", needle
    if family == "words":
        key, value = draw(2), draw(2)
        needle, answer = key + value, value
        needles = [_Needle(needle, depth, True, True)]
    elif family == "multikey":
        pairs = [(draw(2), draw(4)) for _ in range(4)]
        key, answer = pairs[0]
        rng = random.Random(f"kvlab.duo_probes|multikey|{k}")
        needles = [_Needle(key + answer, depth, True, True)]
        needles += [_Needle(a + b, round(rng.random(), 3), False, False) for a, b in pairs[1:]]
    else:  # multihop
        a, v, key = draw(2), draw(4), draw(2)
        rng = random.Random(f"kvlab.duo_probes|multihop|{k}")
        needles = [_Needle(a + v, depth, True, True), _Needle(key + a, round(rng.uniform(depth, 1.0), 3), True, False)]
        answer = a + v
    filler = draw(length)
    return [], needles, (key + answer)[:-1], len(answer), filler, "", answer
