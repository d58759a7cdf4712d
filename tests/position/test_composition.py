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
    "lampe": "lampe(head=16, tail=20, scale=60.0, slope=0.01, offset=-1.0, short=0)",
    "self_extend": "self_extend(group_size=4, window=16)",
    "dpe": "dpe(scales=[1, 2, 4, 8], window=16)",
    "longrope": test_longrope.LISTED,
}
DROP_IN = {"pi": "pi(factor=2)", "ntk": "ntk(factor=4)", "llama3": "llama3(factor=8)", "dprope": "dprope(factor=4)"}
OWN_ATTENTION = {"dca", "string", "rerope", "lampe", "self_extend", "dpe"}
NEEDS_ROTATED_KEYS = {"quest", "tokenselect", "retrieval_attention", "think"}
PLAIN_ROPE_KERNEL = {"vertical_slash", "sale", "block_sparse"}
OTHERS = [m for m in kvlab.methods() if m.stage not in ("baseline", "position", "reuse")]
"""The reuse stage (``ape``) acts only on joined documents: its pairs with every position method
are in ``tests/test_composition.py`` (refused with the pre-RoPE ones, run with the others)."""
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


@pytest.mark.parametrize("position", sorted(OWN_ATTENTION))
def test_a_mask_equals_attending_over_the_allowed_keys_only(position):
    """What prefill and retrieve methods rely on: restricting the keys by ``allowed`` is the
    same attention as handing over only those keys (each KV head its own, at their positions)."""
    from kvlab.engine.rotary import Rotary

    method = kvlab.parse_recipe(PRE_ROPE[position]).position
    torch.manual_seed(0)
    n, t, d, m = 120, 3, 8, 50
    q, k, v = torch.randn(1, 4, t, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    rotary = Rotary(1.0 / 100 ** (torch.arange(0, d, 2).float() / d), trained_length=256)
    q_pos = torch.arange(n - t, n)
    keep = torch.stack([torch.cat([torch.randperm(n - 1)[: m - 1].sort().values, torch.tensor([n - 1])]) for _ in range(2)])
    allowed = torch.zeros(1, 2, t, n, dtype=torch.bool)
    allowed[0, 0, :, keep[0]] = True
    allowed[0, 1, :, keep[1]] = True
    masked = method.attend(q, q_pos, k, torch.arange(n), v, rotary, d**-0.5, allowed)
    index = keep[None, :, :, None].expand(1, 2, m, d)
    subset = method.attend(q, q_pos, k.gather(2, index), keep[None], v.gather(2, index), rotary, d**-0.5)
    torch.testing.assert_close(masked, subset, atol=1e-5, rtol=1e-5)
    dense = method.attend(q, q_pos, k, torch.arange(n), v, rotary, d**-0.5)
    assert not torch.allclose(masked, dense, atol=1e-3)
