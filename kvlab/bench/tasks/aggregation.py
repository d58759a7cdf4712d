"""RULER's aggregation tasks (arXiv:2404.06654): common and frequent words extraction.

- ``common_words`` (cwe): a numbered list where ``num_common`` words occur ``freq_common``
  times and every other word at most ``freq_uncommon`` times; answer the common words. For
  short targets ``freq_common`` is lowered (never below ``freq_uncommon + 2``) so the common
  words take at most half the context, as RULER does for small budgets.
- ``frequent_words`` (fwe): coded 6-letter words whose counts follow Zipf's law with exponent
  ``alpha``; answer the three most frequent.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Iterator

from kvlab.bench.cases import Case, Turn
from kvlab.corpus import vocabulary
from kvlab.bench.tasks.base import Request


def _words(rng: random.Random) -> Iterator[str]:
    """Distinct words: the corpus vocabulary shuffled, then (if exhausted) two-word compounds."""
    vocab = list(vocabulary())
    rng.shuffle(vocab)
    yield from vocab
    seen = set(vocab)
    while True:
        word = rng.choice(vocab) + rng.choice(vocab)
        if word not in seen:
            seen.add(word)
            yield word


def common_words(
    req: Request, *, num_common: int = 10, freq_common: int = 30, freq_uncommon: int = 3
) -> Case:
    """A RULER cwe case."""
    rng = req.rng
    stream = _words(rng)
    common = [next(stream) for _ in range(num_common)]
    uncommon: list[str] = []
    shuffle_seed = rng.getrandbits(64)
    intro = (
        "Below is a numbered list of words. In these words, some appear more often than "
        "others. Memorize the ones that appear most often."
    )
    sample = " ".join(f"{i + 100}. {w}" for i, w in enumerate(common * 3))
    per_entry = req.count(sample) / (3 * num_common)
    affordable = int(req.target / 2 / (num_common * per_entry))
    freq = max(freq_uncommon + 2, min(freq_common, affordable))

    def build(n: int) -> str:
        while len(uncommon) * freq_uncommon < n:
            uncommon.append(next(stream))
        entries = [w for w in common for _ in range(freq)]
        entries += [uncommon[i // freq_uncommon] for i in range(n)]
        random.Random(f"{shuffle_seed}|{n}").shuffle(entries)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
        return intro + "\n\n" + listing

    fit = req.fit(build)
    turn = Turn(
        f"What are the {num_common} most common words in the list above?",
        common,
        "string_match_all",
        f"The top {num_common} words that appear most often in the list are:",
        120,
    )
    return req.case(fit, [turn], freq_common=freq, freq_uncommon=freq_uncommon)


def frequent_words(
    req: Request,
    *,
    num_answers: int = 3,
    alpha: float = 2.0,
    vocab_size: int = 2000,
    word_length: int = 6,
) -> Case:
    """A RULER fwe case."""
    rng = req.rng
    coded: list[str] = []
    seen: set[str] = set()
    while len(coded) < vocab_size:
        word = "".join(rng.choices(string.ascii_lowercase, k=word_length))
        if word not in seen:
            seen.add(word)
            coded.append(word)
    zeta = sum(k**-alpha for k in range(1, 10_001))
    shuffle_seed = rng.getrandbits(64)
    intro = (
        "Read the following coded text and track the frequency of each coded word. Find the "
        f"{num_answers} most frequently appeared coded words."
    )

    def counts(n: int) -> list[int]:
        return [int(n / (rank**alpha * zeta)) for rank in range(1, vocab_size + 1)]

    def build(n: int) -> str:
        words = [w for w, c in zip(coded, counts(n)) for _ in range(c)]
        random.Random(f"{shuffle_seed}|{n}").shuffle(words)
        return intro + "\n\n" + " ".join(words)

    # the smallest n whose top counts are all distinct (rank r+1 strictly below rank r)
    lo = math.ceil(zeta / ((num_answers) ** -alpha - (num_answers + 1) ** -alpha)) + 1
    fit = req.fit(build, lo=lo)
    top = coded[:num_answers]
    turn = Turn(
        f"What are the {num_answers} most frequently appeared words in the above coded text?",
        top,
        "string_match_all",
        f"According to the coded text above, the {num_answers} most frequently appeared words are:",
        50,
    )
    return req.case(fit, [turn], counts=counts(fit.units)[: num_answers + 1])
