"""Variable chains: RULER's variable tracking and SCBench's multi-hop retrieval.

A chain ``VAR A = 12345.``, ``VAR B = VAR A.``, ... (``num_hops`` hops, so ``num_hops + 1``
names) is hidden in statement order in the noise haystack; the question asks for every
variable that ends up with the chain's value (RULER ``vt``, arXiv:2404.06654; SCBench ``vt``
multi-turn variant, arXiv:2412.10319, with one chain per turn).
"""

from __future__ import annotations

from kvlab.bench.cases import Case, Turn
from kvlab.corpus import haystack_units, weave
from kvlab.bench.tasks.base import Request, check_turns
from kvlab.bench.tasks.words import random_names, random_numbers

INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."


Inserts = list[tuple[float, str]]


def _chains(
    req: Request, num_chains: int, num_hops: int
) -> tuple[list[list[str]], list[str], Inserts]:
    """(names per chain, value per chain, (depth, statement) inserts in chain order)."""
    rng = req.rng
    names = random_names(rng, num_chains * (num_hops + 1))
    values = random_numbers(rng, num_chains, 5)
    chains = [names[i * (num_hops + 1) : (i + 1) * (num_hops + 1)] for i in range(num_chains)]
    inserts: Inserts = []
    for chain, value in zip(chains, values):
        depths = sorted(round(rng.random(), 4) for _ in chain)
        statements = [f"VAR {chain[0]} = {value}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        inserts.extend(zip(depths, statements))
    inserts.sort(key=lambda item: item[0])  # stable: a chain's tied statements stay in order
    return chains, values, inserts


def _turn(chain: list[str], value: str) -> Turn:
    return Turn(
        f"Find all variables that are assigned the value {value} in the text above.",
        list(chain),
        "string_match_all",
        f"According to the chain(s) of variable assignment in the text above, {len(chain)} "
        f"variables are assigned the value {value}, they are:",
        48,
    )


def _case(req: Request, num_chains: int, num_hops: int, turns_per_chain: bool) -> Case:
    chains, values, inserts = _chains(req, num_chains, num_hops)

    def build(n: int) -> str:
        return INTRO + "\n\n" + weave(haystack_units("noise", n), inserts)

    fit = req.fit(build)
    if turns_per_chain:
        turns = [_turn(c, v) for c, v in zip(chains, values)]
    else:
        turns = [_turn(chains[0], values[0])]
    return req.case(fit, turns, chains=chains, values=values)


def variable_tracking(req: Request, *, num_chains: int = 1, num_hops: int = 4) -> Case:
    """RULER vt: ``num_chains`` chains in the text, the first one asked."""
    return _case(req, num_chains, num_hops, turns_per_chain=False)


def multi_hop(req: Request, *, num_turns: int = 3, num_hops: int = 4) -> Case:
    """SCBench-style multi-hop: one chain per turn, all in one shared context."""
    return _case(req, check_turns(num_turns), num_hops, turns_per_chain=True)
