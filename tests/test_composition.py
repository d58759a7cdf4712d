"""Every registered method composes with the other stages, or is refused with the reason.

Every method of every stage (the registry, as ``kvlab methods`` lists it) is taken in the
setting its own test module gives (``LISTED``: one that acts on a short prompt of the 2-layer
tiny model). For every pair of methods of two stages (the whole cross product), the recipe
``a + b`` either

- runs: it prefills a 100-token context in 3 chunks, appends an 8-token question (a session's
  request), decodes 3 tokens with finite logits and reports ``kv_bytes``; rolled back to the
  context, the same question gets the same answer (the request left the context as it was);
- or is refused when parsed, with a :class:`kvlab.RecipeError` ``"a + b is not supported:
  why; ..."`` whose reason is one of :data:`REFUSED`'s rules, which say which pairs they set
  apart. A refusal no rule expects, a pair a rule expects refused that runs, and any other
  exception fail.

Then each method runs with a representative of every other stage that it accepts, all at
once (five-stage recipes: :data:`REPRESENTATIVES`, two kinds per stage), and so do the
combinations the issue and the README name (:data:`NAMED`). The README's "Which
combinations hold" paragraph says what :data:`REFUSED` says. About 450 recipes in ~30 s on
one thread (a second thread only waits on these tiny tensors).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

import kvlab
from kvlab.engine.results import Stats
from kvlab.engine.sampling import Sampling
from kvlab.recipe import parse_recipe
from kvlab.registry import STAGES
from tests.compress.test_listed import listed_setting
from tests.conftest import prompt_ids, tiny_model

CONTEXT, QUESTION, NEW_TOKENS, CHUNK = 100, 8, 3, 32
METHODS = [m for m in kvlab.methods() if m.name != "full"]


def stage_methods(*stages: str) -> set[str]:
    return {m.name for m in METHODS if m.stage in stages}


def _position_methods(flag: str) -> set[str]:
    """Position methods whose default instance has ``flag`` set."""
    from kvlab.registry import method_class

    return {m.name for m in METHODS if m.stage == "position" and getattr(method_class(m.name)(), flag)}


PRE_ROPE = "keeps keys before RoPE"
OWN_ATTENTION = "attends with its block-sparse kernel over keys at plain RoPE positions"
SELECTS_KV = "chooses the kept KV entries itself"
RAGGED = "keeps a different number of entries per KV head"
JOINED = "joins documents encoded apart into one cache of plain entries"
REFUSED = {
    PRE_ROPE: (_position_methods("stores_pre_rope"), {"quest", "tokenselect", "retrieval_attention", "think", "ape"}),
    OWN_ATTENTION: (_position_methods("own_attention"), {"vertical_slash", "block_sparse", "sale"}),
    SELECTS_KV: ({"fastkv"}, stage_methods("compress")),
    RAGGED: ({"adakv", "duo_attention"}, stage_methods("quantize", "retrieve")),
    JOINED: (stage_methods("reuse"), stage_methods("prefill", "compress", "quantize", "retrieve")),
}
"""The refusals, by rule: the words of the reason, and which methods it sets against which.
- position methods that keep keys before RoPE, against methods that score or prune the
  stored keys as post-RoPE vectors;
- position methods with their own attention arithmetic (several passes), against the
  block-sparse prefill kernels, which rotate at plain RoPE positions;
- FastKV, which keeps the entries its own budget chooses, against any compress method;
- compress methods that keep a different number of entries per KV head (ragged storage),
  against the quantize formats and the retrieve methods (one rectangular tensor per layer);
- the reuse methods (APE: documents encoded apart, joined, attended with their own
  arithmetic), against every method of the prefill, compress, quantize and retrieve stages
  (and, by the first rule, the position methods that keep keys before RoPE)."""

REPRESENTATIVES = {
    "position": ["yarn(factor=2)", "self_extend(group_size=4, window=16)"],
    "prefill": [
        "vertical_slash(vertical_size=4, slash_size=8, forced_columns=2, forced_diagonals=4, "
        "last_q=16, block=8)",
        "gemfilter(topk=40)",
    ],
    "compress": ["snapkv(budget=30, window=8)", "h2o(budget=30)"],
    "quantize": ["kivi(group=8, residual=16)", "think(ratio=0.5)"],
    "retrieve": [
        "tokenselect(budget=16, n_init=4, n_local=16)",
        "shadowkv(budget=16, rank=8, outliers=2, local=2)",
    ],
    "reuse": ["ape", "ape(temperature=0.5, scale=0.7)"],
}
"""Per stage, two kinds the other stages must meet: RoPE'd keys (yarn) and keys kept before
RoPE (self_extend); a sparse pattern (vertical_slash) and a prefill of selected tokens only
(gemfilter); eviction at the end of the prefill (snapkv) and while decoding (h2o); quantised
entries (kivi) and pruned key channels (think); selection in place (tokenselect, in prefill
chunks too) and entries moved out of the storage (shadowkv)."""

NAMED = [
    "yarn(factor=2) + vertical_slash + snapkv(budget=0.25) + tokenselect(budget=0.125)",
    "yarn(factor=2) + vertical_slash(vertical_size=4, slash_size=8, forced_columns=2, "
    "forced_diagonals=4, last_q=16, block=8) + snapkv(budget=0.25) + kivi(group=8, residual=16) + "
    "tokenselect(budget=0.125, n_init=4, n_local=16)",
    "snapkv(budget=0.25) + quest(budget=512)",
    "yarn(factor=4) + snapkv(budget=256) + kivi(bits=2) + quest(budget=512, page=16)",
    "yarn(factor=4) + ashape(window=2048)",
]
"""Recipes the issue and the README name (at their defaults most act only on long prompts;
the second is the first at settings that act here)."""


def name_of(term: str) -> str:
    return term.split("(")[0].strip()


def expected_refusal(a: str, b: str) -> str | None:
    """The reason words of the :data:`REFUSED` rule for methods ``a`` and ``b``, if any."""
    for reason, (left, right) in REFUSED.items():
        if (a in left and b in right) or (b in left and a in right):
            return reason
    return None


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def engine():
    return kvlab.Engine(tiny_model(), progress=False, prefill_chunk=CHUNK)


def run(engine, recipe) -> None:
    """Context in chunks, a question appended, a few decoded tokens (finite, ``kv_bytes``
    measured), then back to the context and the same question again (the same answer)."""
    sequence = engine.new_sequence(recipe)
    assert len(engine.chunks(CONTEXT)) == 3
    logits = engine.prefill(sequence, prompt_ids(CONTEXT, seed=8), compress=True)
    assert torch.isfinite(logits).all()
    context = sequence.mark()
    question = prompt_ids(QUESTION, seed=9)
    answers = []
    for _ in range(2):
        logits = engine.prefill(sequence, question, compress=False)
        decoded = engine.decode(sequence, logits, NEW_TOKENS, Sampling().sampler(engine.device), keep_logprobs=True)
        assert len(decoded.tokens) == NEW_TOKENS
        assert all(bool(torch.isfinite(row).all()) for row in decoded.logprobs)
        stats = Stats.measure(sequence, CONTEXT + QUESTION, QUESTION, 0.0, decoded)
        assert isinstance(stats.kv_bytes, int) and stats.kv_bytes > 0
        assert math.isfinite(stats.kv_tokens) and stats.kv_tokens > 0
        answers.append((decoded.tokens, torch.stack(decoded.logprobs)))
        sequence.rollback(context)
    assert answers[0][0] == answers[1][0]
    torch.testing.assert_close(answers[0][1], answers[1][1], atol=1e-4, rtol=1e-4)


def check(engine, recipe: str) -> bool:
    """Run ``recipe``, or check that it is refused by a rule of :data:`REFUSED` (for a pair
    of its methods) with a message that names both and the reason; True when it ran."""
    names = [name_of(term) for term in recipe.split(" + ")]
    expected = {
        (a, b, reason) for a, b in itertools.combinations(names, 2)
        if (reason := expected_refusal(a, b)) is not None
    }
    try:
        parsed = parse_recipe(recipe)
    except kvlab.RecipeError as error:
        message = str(error)
        assert expected, f"{recipe!r} refused, and no rule expects it: {message}"
        assert "is not supported:" in message, message
        assert any(
            message.startswith((f"{a} + {b} ", f"{b} + {a} ")) and reason in message
            for a, b, reason in expected
        ), message
        return False
    assert not expected, f"{recipe!r} was not refused: {expected}"
    run(engine, parsed)
    return True


PAIRS = [
    pytest.param(a, b, id=f"{a.name}+{b.name}")
    for a, b in itertools.combinations(METHODS, 2)
    if a.stage != b.stage
]


@pytest.mark.parametrize("a, b", PAIRS)
def test_every_two_methods_of_two_stages_run_or_are_refused_with_the_reason(engine, a, b):
    check(engine, f"{listed_setting(a)} + {listed_setting(b)}")


def with_representatives(info, kind: int) -> str:
    """``info``'s setting with, for every other stage, its representative of ``kind`` (0 or
    1), or the other one where that one is refused with a term already chosen (none where
    both are)."""
    terms = {info.stage: listed_setting(info)}
    for stage in STAGES:
        if stage != info.stage:
            for rep in REPRESENTATIVES[stage][kind:] + REPRESENTATIVES[stage][:kind]:
                if all(expected_refusal(name_of(rep), name_of(t)) is None for t in terms.values()):
                    terms[stage] = rep
                    break
    return " + ".join(terms[stage] for stage in STAGES if stage in terms)


@pytest.mark.parametrize("kind", [0, 1])
@pytest.mark.parametrize("info", METHODS, ids=lambda m: m.name)
def test_a_method_with_every_stage_it_accepts_at_once(engine, info, kind):
    recipe = with_representatives(info, kind)
    # the ragged compress methods take 3 stages; a reuse method takes only a position method
    assert recipe.count(" + ") >= (1 if info.stage == "reuse" else 2), recipe
    assert check(engine, recipe)


@pytest.mark.parametrize("recipe", NAMED)
def test_the_named_combinations_run(engine, recipe):
    assert check(engine, recipe)


def test_the_remedy_the_pre_rope_refusal_names_runs(engine):
    """dynamic_ntk keeping its keys rotated (``rerotate_cache=false``) is a drop-in position
    method: the post-RoPE scorers it is refused with at its default take it."""
    for refused in ("dynamic_ntk(factor=4) + think(ratio=0.5)", "dynamic_ntk(factor=4) + quest(budget=32, page=8)"):
        with pytest.raises(kvlab.RecipeError, match="rerotate_cache=false"):
            parse_recipe(refused)
    run(engine, parse_recipe(
        "dynamic_ntk(factor=4, rerotate_cache=false) + think(ratio=0.5) + quest(budget=32, page=8, dense_layers=0)"
    ))


def test_every_rule_names_registered_methods_refuses_a_pair_and_is_in_the_readme():
    names = {m.name for m in METHODS}
    for left, right in REFUSED.values():
        assert left <= names and right <= names and left.isdisjoint(right)
    seen = {expected_refusal(a.name, b.name) for a, b in (p.values for p in PAIRS)}
    assert set(REFUSED) <= seen
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraph = readme[readme.index("**Which combinations hold.**"):readme.index("## Set up")]
    named = set().union(*REFUSED[PRE_ROPE], *REFUSED[OWN_ATTENTION], REFUSED[SELECTS_KV][0], REFUSED[RAGGED][0],
                        REFUSED[JOINED][0])
    for name in sorted(named):
        assert f"`{name}`" in paragraph, name
