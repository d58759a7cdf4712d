"""FastKV: later layers run only the tokens the TSP layer keeps; SnapKV-style KV budgets."""

import pytest
import torch

from tests.compress.reference import Rope, project
from tests.conftest import assert_recipe_refused, prompt_ids, teacher_logprobs, tiny_engine, tiny_model

LISTED = "fastkv(tsp_rate=0.2, budget=30)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def snap_votes(qr, kr, window, kernel, group):
    """SnapKV votes written out: softmax attention of the last ``window`` queries (causal),
    summed over them, for every entry before the window; max-pooled (``kernel`` wide, clipped
    at the ends); averaged over the query heads of each KV head. ``[Hkv, m - window]``."""
    hq, m = qr.shape[0], qr.shape[1]
    scale = qr.shape[-1] ** -0.5
    votes = torch.zeros(hq, m - window)
    for h in range(hq):
        for i in range(m - window, m):
            p = torch.softmax(qr[h, i] @ kr[h // group, : i + 1].T * scale, dim=-1)
            votes[h] += p[: m - window]
    half = kernel // 2
    pooled = torch.stack([
        torch.stack([votes[h, max(0, j - half) : j + half + 1].max() for j in range(m - window)])
        for h in range(hq)
    ])
    return torch.stack([pooled[kv * group : (kv + 1) * group].mean(0) for kv in range(hq // group)])


def top_plus_window(scores, keep, window, m):
    """Sorted indices: the top ``keep - window`` of ``scores`` ``[m - window]`` plus the window."""
    return sorted(scores.topk(keep - window).indices.tolist() + list(range(m - window, m)))


@torch.no_grad()
def fastkv_reference(ids, follow, tsp, rate, budget, window=8, kernel=7):
    """Log-probs of the prompt's next token and of ``follow`` teacher-forced, through the tiny
    model written out: layers <= ``tsp`` see every token; the TSP layer keeps the top
    ``int(rate * n)`` tokens (votes averaged over all heads) plus the window; later layers run
    only those rows at their original positions; every layer keeps its top ``budget``
    entries per KV head; decoding attends to each KV head's kept entries plus the new ones."""
    model = tiny_model("llama")
    rope = Rope(model)
    n = len(ids)
    h = model.model.embed_tokens(torch.tensor([ids]))
    pos = torch.arange(n)
    held = []  # per layer, per KV head: (keys [m, d], values [m, d])
    for index, layer in enumerate(model.model.layers):
        q, k, v = (x[0] for x in project(layer, h))
        qr, kr = rope(q, pos), rope(k, pos)
        g, m = q.shape[0] // k.shape[0], q.shape[1]
        out = torch.zeros_like(q)
        for hh in range(q.shape[0]):
            for i in range(m):
                p = torch.softmax(qr[hh, i] @ kr[hh // g, : i + 1].T * q.shape[-1] ** -0.5, -1)
                out[hh, i] = p @ v[hh // g, : i + 1]
        votes = snap_votes(qr, kr, window, kernel, g)
        heads = []
        for kv in range(k.shape[0]):
            keep = list(range(m)) if m <= budget else top_plus_window(votes[kv], budget, window, m)
            heads.append((kr[kv, keep], v[kv, keep]))
        held.append(heads)
        h = h + layer.self_attn.o_proj(out.transpose(0, 1).reshape(1, m, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        tsp_len = int(rate * n)
        if index == tsp and tsp_len + window < m:
            rows = top_plus_window(votes.mean(0), tsp_len + window, window, m)
            h, pos = h[:, rows], pos[rows]
    logits = [model.lm_head(model.model.norm(h))[0, -1]]
    for step, token in enumerate(follow[:-1]):
        h = model.model.embed_tokens(torch.tensor([[token]]))
        at = torch.tensor([n + step])
        for index, layer in enumerate(model.model.layers):
            q, k, v = (x[0] for x in project(layer, h))
            qr, kr = rope(q, at), rope(k, at)
            g = q.shape[0] // k.shape[0]
            held[index] = [(torch.cat([ks, kr[kv]]), torch.cat([vs, v[kv]])) for kv, (ks, vs) in enumerate(held[index])]
            out = torch.zeros_like(q)
            for hh in range(q.shape[0]):
                ks, vs = held[index][hh // g]
                out[hh, 0] = torch.softmax(qr[hh, 0] @ ks.T * q.shape[-1] ** -0.5, -1) @ vs
            h = h + layer.self_attn.o_proj(out.transpose(0, 1).reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits.append(model.lm_head(model.model.norm(h))[0, -1])
    return torch.log_softmax(torch.stack(logits), -1)


@pytest.mark.parametrize("fraction, tsp, rate, budget", [
    (15 / 32, 0, 0.2, 1000),  # propagation only: later layers hold the 24 + 8 kept tokens
    (15 / 32, 0, 0.2, 30),  # and KV budgets in every layer (the later one: 32 -> 30)
    (0.5, 1, 0.2, 40),  # TSP at the last layer: nothing after it, budgets only
    (15 / 32, 0, 0.5, 50),
])
def test_equals_the_written_out_reference(fraction, tsp, rate, budget):
    ids, follow = prompt_ids(120, seed=3), prompt_ids(4, seed=9)
    expected = fastkv_reference(ids, follow, tsp, rate, budget)
    engine = tiny_engine()
    recipe = f"fastkv(tsp_layer={fraction}, tsp_rate={rate}, budget={budget})"
    _, got = teacher_logprobs(engine, recipe, ids, follow)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_equals_full_when_everything_propagates_and_fits_the_budget():
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, "full", max_new_tokens=6)
    same = engine.generate_ids(ids, "fastkv(tsp_rate=1.0, budget=1.0)", max_new_tokens=6)
    assert same.token_ids == full.token_ids and same.stats.prefilled_per_layer == [120, 120]
    assert engine.generate_ids(ids, LISTED, max_new_tokens=6).token_ids != full.token_ids


def test_later_layers_run_and_hold_only_the_propagated_tokens():
    engine = tiny_engine()
    engine.prefill_chunk = 32  # FastKV prefills the context in one forward regardless
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, "full", max_new_tokens=1).stats
    stats = engine.generate_ids(ids, "fastkv(tsp_rate=0.2, budget=1000)", max_new_tokens=1).stats
    assert stats.prefilled_per_layer == [120, 24 + 8]
    sequence = engine.new_sequence("fastkv(tsp_rate=0.2, budget=1000)")
    engine.prefill(sequence, ids, compress=True)
    assert [layer.num_entries for layer in sequence.layers] == [120, 32]
    later = sequence.layers[1].key_positions().tolist()
    assert later[-8:] == list(range(112, 120)) and later == sorted(later)  # original positions
    assert stats.kv_bytes < full.kv_bytes * (120 + 32 + 16) / 240  # positions index: small
    assert sequence.layers[1].nbytes() < sequence.layers[0].nbytes() / 3


def test_a_session_question_is_appended_densely_after_the_context():
    engine = tiny_engine()
    ids, question = prompt_ids(120), prompt_ids(5, seed=4)
    sequence = engine.new_sequence(LISTED)
    engine.prefill(sequence, ids, compress=True)
    engine.prefill(sequence, question, compress=False)
    assert sequence.layer_tokens == [5, 5]
    assert [layer.num_entries for layer in sequence.layers] == [35, 35]


@pytest.mark.parametrize("text, fragment", [
    ("fastkv(kernel=4)", "odd"), ("fastkv(tsp_rate=1.5)", "<= 1.0"), ("fastkv(budget=0)", "budget"),
    ("fastkv + snapkv", "without a compress method"),
])
def test_bad_parameters_and_a_second_kv_selection_are_refused(text, fragment):
    assert_recipe_refused(text, fragment)
