"""SCBench-style shared-context tasks (arXiv:2412.10319): several questions on one context.

- ``kv_retrieval``: a JSON object of random UUID keys and values; each turn asks for the value
  of another key (SCBench ``kv``; scored by ``contains``).
- ``prefix_suffix``: a list of words; each turn asks for the one word with a given 3-letter
  prefix and suffix. Words matching any asked pattern are kept out of the list, so each answer
  is unique by construction.
- ``math_find``: a list of distinct integers; turns ask for the largest, smallest, second
  largest, second smallest, or the difference of the extremes (SCBench ``mf``; scored by
  ``first_number``).

A UUID pair costs ~70 tokens, too coarse to land within 2% of short targets, so the first
``tuned`` decoy slots and the asked values each have a *light* and a *heavy* UUID (the fewest-
and most-token of ``candidates`` random draws: UUIDs with more digits take more tokens) and
the fit picks how many are heavy. The asked keys never change with the length; an asked
value may (it is random either way).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from kvlab.bench.cases import Case, Turn
from kvlab.corpus import vocabulary
from kvlab.bench.fit import Fit
from kvlab.bench.tasks.base import Request, check_turns
from kvlab.bench.tasks.words import random_uuid
from kvlab.errors import InputError


def _place(items: list[str], inserts: list[tuple[float, str]]) -> list[str]:
    """``items`` with each ``(fraction, item)`` inserted at ``round(fraction * len(items))``."""
    slots: dict[int, list[str]] = {}
    for fraction, item in inserts:
        slots.setdefault(round(fraction * len(items)), []).append(item)
    out: list[str] = []
    for i in range(len(items) + 1):
        out.extend(slots.get(i, ()))
        if i < len(items):
            out.append(items[i])
    return out


def kv_retrieval(
    req: Request, *, num_turns: int = 3, candidates: int = 32, tuned: int = 16
) -> Case:
    """An SCBench kv case: one JSON object, ``num_turns`` keys asked."""
    rng = req.rng
    asked_keys = [random_uuid(rng) for _ in range(check_turns(num_turns))]
    fractions = [round(rng.random(), 4) for _ in asked_keys]
    used = set(asked_keys)

    def choices(count: int) -> list[tuple[str, str]]:
        """``count`` (fewest-token, most-token) picks, each among ``candidates`` UUIDs."""
        draws = [[random_uuid(rng) for _ in range(candidates)] for _ in range(count)]
        flat = [u for d in draws for u in d if u not in used]
        tokens = dict(zip(flat, req.count_many(flat)))
        picks = []
        for d in draws:
            ranked = sorted((tokens[u], u) for u in d if u in tokens)
            picks.append((ranked[0][1], ranked[-1][1]))
            used.update((ranked[0][1], ranked[-1][1]))
        return picks

    asked_values = choices(num_turns)
    tuned_keys, tuned_values = choices(tuned), choices(tuned)
    stream = req.child_rng()
    plain: list[str] = []

    def entry(key: str, value: str) -> str:
        return f"{json.dumps(key)}: {json.dumps(value)}"

    def decoys(n: int, n_heavy: int) -> list[str]:
        while len(plain) < n - tuned:
            key = random_uuid(stream)
            if key not in used:
                used.add(key)
                plain.append(entry(key, random_uuid(stream)))
        slots = enumerate(zip(tuned_keys, tuned_values))
        out = [entry(k[i < n_heavy], v[i < n_heavy]) for i, (k, v) in slots]
        return out[:n] + plain[: max(0, n - tuned)]

    intro = "Extract the value corresponding to the specified key in the JSON object below."

    def build(n: int, n_heavy: int) -> str:
        """``n`` decoys; the first ``n_heavy`` tuned slots (then asked values) take more tokens."""
        spare = n_heavy - min(n, tuned)
        asked = [(k, v[i < spare]) for i, (k, v) in enumerate(zip(asked_keys, asked_values))]
        inserts = [(f, entry(k, v)) for f, (k, v) in zip(fractions, asked)]
        items = _place(decoys(n, n_heavy), inserts)
        return intro + "\n\nJSON data:\n{" + ", ".join(items) + "}"

    coarse = req.fit(lambda n: build(n, 0))
    n = coarse.units - 1 if coarse.tokens > req.target and coarse.units > 0 else coarse.units
    fine = req.fit(lambda j: build(n, j), hi=min(n, tuned) + num_turns)
    fit = min((coarse, fine), key=lambda f: abs(f.tokens - req.target))
    data = json.loads(fit.text.split("JSON data:\n", 1)[1])
    turns = [
        Turn(
            f'Key: "{key}"\nWhat is the value associated with this key in the JSON object above?',
            [data[key]],
            "contains",
            "The value associated with the specified key is:",
            48,
        )
        for key in asked_keys
    ]
    return req.case(Fit(len(data), fit.text, fit.tokens), turns, key_depths=fractions)


def prefix_suffix(req: Request, *, num_turns: int = 3, affix: int = 3) -> Case:
    """A prefix-suffix case: a word list, ``num_turns`` (prefix, suffix) questions."""
    rng = req.rng
    vocab = vocabulary()
    candidates = [w for w in vocab if len(w) >= 2 * affix + 1]
    targets: list[str] = []
    patterns: list[tuple[str, str]] = []
    for _ in range(1000 * check_turns(num_turns)):
        if len(targets) == num_turns:
            break
        word = rng.choice(candidates)
        pattern = (word[:affix], word[-affix:])
        if word in targets or pattern in patterns:
            continue
        if any(t.startswith(pattern[0]) and t.endswith(pattern[1]) for t in targets):
            continue
        if any(word.startswith(p) and word.endswith(s) for p, s in patterns):
            continue
        targets.append(word)
        patterns.append(pattern)
    def clashes(word: str) -> bool:  # fits an asked pattern, or contains an answer ("considered")
        return any(word.startswith(p) and word.endswith(s) for p, s in patterns) or any(
            t in word for t in targets
        )

    pool = [w for w in vocab if not clashes(w)]
    fractions = [round(rng.random(), 4) for _ in targets]
    stream = req.child_rng()
    words: list[str] = []
    intro = "Below is a list of words. Memorize it: I will ask you to find words in it afterwards."

    def build(n: int) -> str:
        while len(words) < n:
            words.append(stream.choice(pool))
        return intro + "\n\n" + " ".join(_place(words[:n], list(zip(fractions, targets))))

    fit = req.fit(build)
    turns = [
        Turn(
            f'Which word in the list above starts with "{p}" and ends with "{s}"?',
            [word],
            "contains",
            f'The word that starts with "{p}" and ends with "{s}" is',
            16,
        )
        for word, (p, s) in zip(targets, patterns)
    ]
    return req.case(fit, turns, word_depths=fractions)


def _second_largest(xs: list[int]) -> int:
    return sorted(xs)[-2]


def _second_smallest(xs: list[int]) -> int:
    return sorted(xs)[1]


OPERATIONS: dict[str, tuple[str, Callable[[list[int]], int]]] = {
    "max": ("largest number", max),
    "min": ("smallest number", min),
    "second_largest": ("second largest number", _second_largest),
    "second_smallest": ("second smallest number", _second_smallest),
    "range": (
        "difference between the largest and the smallest number",
        lambda xs: max(xs) - min(xs),
    ),
}


def math_find(req: Request, *, num_turns: int = 3, high: int = 99_999) -> Case:
    """An SCBench mf case: a list of distinct integers in [0, ``high``], one operation per turn."""
    rng = req.rng
    ops = rng.sample(list(OPERATIONS), check_turns(num_turns))
    stream = req.child_rng()
    numbers: list[int] = []
    seen: set[int] = set()
    intro = "Below is a list of numbers. Memorize it: I will ask you questions about it afterwards."

    def build(n: int) -> str:
        if n > high + 1:
            raise InputError(
                f"math_find: {n} distinct numbers do not fit in [0, {high}]; raise high"
            )
        while len(numbers) < n:
            x = stream.randint(0, high)
            if x not in seen:
                seen.add(x)
                numbers.append(x)
        return intro + "\n\n[" + ", ".join(map(str, numbers[:n])) + "]"

    fit = req.fit(build, lo=2, hi=high + 1)
    values = numbers[: fit.units]
    turns = []
    for op in ops:
        what, fn = OPERATIONS[op]
        turns.append(
            Turn(f"What is the {what} in the list above?", [str(fn(values))], "first_number",
                 f"The {what} in the list is", 16)
        )
    return req.case(fit, turns, operations=ops)
