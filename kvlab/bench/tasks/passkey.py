"""Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", arXiv:2305.16300, appendix).

The test the context-extension papers report past the trained window (PI, arXiv:2306.15595
§3.3; YaRN, arXiv:2309.00071 §4.3.2; Self-Extend, arXiv:2401.01325 §4.2): a 5-digit pass key,
stated in the paper's words ``The pass key is {key}. Remember it. {key} is the pass key.``, is
hidden at the requested depth of the paper's filler (the five noise sentences of
:data:`kvlab.corpus.NOISE`, repeated); the model is asked for it.
"""

from __future__ import annotations

from kvlab.bench.cases import Case, Turn
from kvlab.bench.tasks.base import Request
from kvlab.bench.tasks.words import random_numbers
from kvlab.corpus import haystack_units, weave

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)


def passkey_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey(req: Request, *, digits: int = 5) -> Case:
    """A passkey case: ``digits``-digit key (the paper's 5) at the requested depth."""
    key = random_numbers(req.rng, 1, digits)[0]
    depth = req.pick_depth()

    def build(n: int) -> str:
        return INTRO + "\n\n" + weave(haystack_units("noise", n), [(depth, passkey_line(key))])

    fit = req.fit(build)
    turn = Turn("What is the pass key?", [key], "string_match_all", "The pass key is", 16)
    return req.case(fit, [turn], depth=depth, haystack="noise", needles=[passkey_line(key)],
                    needle_depths=[depth])


__all__ = ["passkey", "passkey_line"]
