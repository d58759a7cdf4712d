"""Every position method composes with every prefill, compress, quantize and retrieve method,
or the recipe refuses the pair with a message naming both (tiny model, 120-token prompt)."""

from __future__ import annotations

import pytest
import torch

import kvlab
from tests.compress.test_listed import listed_setting
from tests.conftest import prompt_ids, tiny_engine
from tests.position import test_longrope

PRE_ROPE = {  # keep keys before RoPE
    "dca": "dca(chunk_size=48, local_window=8)",
    "string": "string(shift=40, local_window=8)",
    "rerope": "rerope(window=16, leaky=true, k=4)",
    "lampe": "lampe(head=16, scale=60.0, slope=0.01, offset=-1.0)",
    "self_extend": "self_extend(group_size=4, window=16)",
    "longrope": test_longrope.LISTED,
}
DROP_IN = {"pi": "pi(factor=2)", "ntk": "ntk(factor=4)", "llama3": "llama3(factor=8)", "dprope": "dprope(factor=4)"}
OWN_ATTENTION = {"dca", "string", "rerope", "lampe", "self_extend"}
NEEDS_ROTATED_KEYS = {"quest", "tokenselect", "retrieval_attention", "think"}
PLAIN_ROPE_KERNEL = {"vertical_slash", "sale", "block_sparse"}
OTHERS = [m for m in kvlab.methods() if m.stage not in ("baseline", "position")]
POSITIONS = {**PRE_ROPE, **DROP_IN}


def refused(position: str, other: str) -> bool:
    """The pairs the recipe refuses, written out: pre-RoPE keys with a method that reads
    post-RoPE keys; a method's own attention with a plain-RoPE block-sparse kernel."""
    if position in PRE_ROPE and other in NEEDS_ROTATED_KEYS:
        return True
    return position in OWN_ATTENTION and other in PLAIN_ROPE_KERNEL


@pytest.mark.parametrize("other", [m.name for m in OTHERS])
@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_each_pair_is_accepted_or_refused_by_name(position, other):
    info = {m.name: m for m in OTHERS}[other]
    recipe = f"{POSITIONS[position]} + {listed_setting(info)}"
    if refused(position, other):
        with pytest.raises(kvlab.RecipeError) as error:
            kvlab.parse_recipe(recipe)
        assert position in str(error.value) and other in str(error.value)
    else:
        parsed = kvlab.parse_recipe(recipe)
        assert parsed.position.name == position and getattr(parsed, info.stage).name == other


@pytest.mark.parametrize("index, info", list(enumerate(OTHERS)), ids=[m.name for m in OTHERS])
def test_accepted_pairs_run_and_the_position_method_still_acts(index, info):
    """Each method of another stage runs with one pre-RoPE position method (taken in turn, so
    every one is exercised; a drop-in one where none is accepted): prefill in chunks, decoding
    steps, finite log-probabilities that differ from the other method alone."""
    accepted = [name for name in sorted(PRE_ROPE) if not refused(name, info.name)] or sorted(DROP_IN)
    position = accepted[index % len(accepted)]
    engine = tiny_engine()
    engine.prefill_chunk = 48
    ids = prompt_ids(120, seed=8)
    results = []
    for recipe in (f"{POSITIONS[position]} + {listed_setting(info)}", listed_setting(info)):
        cache = engine.new_sequence(recipe)
        logits = engine.prefill(cache, ids, compress=True)
        results.append(engine.teacher_force(cache, logits, prompt_ids(4, seed=9)))
    assert torch.isfinite(results[0]).all()
    assert not torch.allclose(results[0], results[1], atol=1e-4), position
