"""RULER's needle-in-a-haystack family (arXiv:2404.06654, section 3).

A needle ``One of the special magic numbers for {key} is: {value}.`` (key: adjective-noun,
value: a 7-digit number) is hidden in a *noise* or *prose* haystack. Variants: ``num_keys``
keys in the haystack (the others are distractors), ``num_values`` values per key (all asked),
``num_queries`` keys asked in one question, or ``num_turns`` keys asked one per turn (a
multi-turn NIAH in SCBench's shared-context style: each turn retrieves another needle of the
same context). The first asked needle sits at the requested depth; the others at random
depths.
"""

from __future__ import annotations

from kvlab.bench.cases import Case, Turn
from kvlab.corpus import haystack_units, prose_text, sentence_starts, weave
from kvlab.bench.tasks.base import Request, check_turns
from kvlab.errors import InputError
from kvlab.bench.tasks.words import random_keys, random_numbers


def needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _joined(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def niah(
    req: Request,
    *,
    haystack: str = "noise",
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    num_turns: int = 1,
) -> Case:
    """A NIAH case; see the module docstring for the parameters."""
    check_turns(num_turns)
    if num_turns > 1 and (num_queries > 1 or num_values > 1 or num_keys < num_turns):
        raise InputError(
            f"niah(num_turns={num_turns}): one key per turn needs num_queries=1, num_values=1 "
            f"and num_keys >= num_turns (got num_keys={num_keys}, num_queries={num_queries}, "
            f"num_values={num_values})"
        )
    rng = req.rng
    forbidden = prose_text() if haystack == "prose" else ""
    keys = random_keys(rng, num_keys, forbidden)
    values = random_numbers(rng, num_keys * num_values, 7)
    by_key = {k: values[i * num_values : (i + 1) * num_values] for i, k in enumerate(keys)}
    asked = keys[:num_queries]
    depth = req.pick_depth()
    needles = [(k, v) for k in keys for v in by_key[k]]
    rng.shuffle(needles)
    first = (asked[0], by_key[asked[0]][0])
    needles.remove(first)
    inserts = [(depth, needle(*first))]
    inserts += [(round(rng.random(), 4), needle(k, v)) for k, v in needles]
    start = rng.choice(sentence_starts()) if haystack == "prose" else 0

    several = num_values * num_queries > 1  # answers to give
    if len(inserts) > 1:  # several needles hidden (RULER words its multikey intro so too)
        intro = (
            "Some special magic numbers are hidden within the following text. Make sure to "
            "memorize them. I will quiz you about the numbers afterwards."
        )
    else:
        intro = (
            "A special magic number is hidden within the following text. Make sure to memorize "
            "it. I will quiz you about the number afterwards."
        )

    def build(n: int) -> str:
        return intro + "\n\n" + weave(haystack_units(haystack, n, start), inserts)

    fit = req.fit(build)
    if num_turns > 1:
        turns = [_question([key], by_key, several=False) for key in keys[:num_turns]]
    else:
        turns = [_question(asked, by_key, several)]
    return req.case(
        fit,
        turns,
        depth=depth,
        haystack=haystack,
        needles=[needle(k, v) for k in keys for v in by_key[k]],
        needle_depths=[d for d, _ in inserts],
    )


def _question(asked: list[str], by_key: dict[str, list[str]], several: bool) -> Turn:
    """The turn asking for the values of the ``asked`` keys."""
    answers = [v for k in asked for v in by_key[k]]
    what = _joined(asked)
    if several:
        question = (
            f"What are all the special magic numbers for {what} mentioned in the provided text?"
        )
        prefix = f"The special magic numbers for {what} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {what} mentioned in the provided text?"
        prefix = f"The special magic number for {what} mentioned in the provided text is"
    return Turn(question, answers, "string_match_all", prefix, 32 if not several else 64)
