"""TOVA keeps one set per layer: the top entries of the last query's head-averaged attention."""

import torch

from tests.layers import probs_of, random_layer, rotary
from tests.conftest import prefilled, prompt_ids, tiny_engine
from kvlab.compress.tova import TOVA


LISTED = "tova(budget=30)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def reference_keep(q, keys, budget, batch_row=0):
    """Average the last query's attention over all query heads; keep the top ``budget``."""
    n, hq, hk = keys.shape[2], q.shape[1], keys.shape[1]
    rot = rotary(q.shape[-1])
    rows = [
        probs_of(q[batch_row, h, -1], n - 1, keys[batch_row, h * hk // hq], rot)
        for h in range(hq)
    ]
    mean = torch.stack(rows).mean(0)
    return sorted(mean.topk(budget).indices.tolist())


def test_one_set_per_layer_matches_the_reference():
    ctx, q = random_layer(n=60, seed=5)
    keys_before = ctx.layer.keys.clone()
    expected = reference_keep(q, keys_before, 15)
    TOVA(budget=15).compress(q, ctx)
    assert ctx.layer.positions.tolist() == expected  # [k]: one position tensor for all heads
    torch.testing.assert_close(ctx.layer.keys, keys_before[:, :, expected])


def test_each_batch_row_chooses_for_itself():
    ctx, q = random_layer(n=60, batch=2, seed=6)
    expected = [reference_keep(q, ctx.layer.keys, 15, row) for row in range(2)]
    TOVA(budget=15).compress(q, ctx)
    assert ctx.layer.positions.shape == (2, 2, 15)
    for row in range(2):
        assert ctx.layer.positions[row].tolist() == [expected[row]] * 2


def test_no_forced_sinks_or_recent_tokens():
    """Only attention decides: the first and the last entries go when nobody attends to them."""
    ctx, q = random_layer(n=30, seed=7)
    q[:, :, -1] = torch.randn(8)  # the same last query in every head
    target = rotary(8).rotate(q[:, :1, -1:], torch.tensor([29]))[0, 0, 0]
    ctx.layer.keys[:, :, [3, 7, 24]] = 20 * target / target.norm()
    TOVA(budget=3).compress(q, ctx)
    assert ctx.layer.positions.tolist() == [3, 7, 24]


def test_physical_size_in_the_engine():
    engine = tiny_engine()
    ids = prompt_ids(160)
    whole = engine.generate_ids(ids, "full", max_new_tokens=1).stats.kv_bytes
    cache = prefilled(engine, "tova(budget=40)", ids)
    assert all(layer.positions.shape == (40,) for layer in cache.layers)
    assert cache.layers[0].positions.tolist() != cache.layers[1].positions.tolist()
    small = engine.generate_ids(ids, "tova(budget=40)", max_new_tokens=1).stats
    assert small.kv_bytes == whole * 40 // 160 + 2 * 40 * 4  # one shared int32 position tensor


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    roomy = engine.generate_ids(ids, "tova(budget=200)", max_new_tokens=8)  # never over budget
    assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes


def test_engine_keeps_the_top_of_the_last_eager_query_averaged_over_every_head():
    from tests.compress.reference import assert_top_k, eager_run

    n, budget = 120, 30
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids)
    engine = tiny_engine()
    cache = engine.new_sequence(f"tova(budget={budget})")
    logits = engine.prefill(cache, ids, compress=True)
    for index, layer in enumerate(cache.layers):
        positions = layer.key_positions()
        assert positions.dim() == 1  # one set for every head
        assert_top_k(positions.tolist(), run.probs[index][:, -1].mean(dim=0), budget)
    engine.teacher_force(cache, logits, prompt_ids(4, seed=4))
    for layer in cache.layers:
        kept = layer.key_positions().tolist()
        assert len(kept) == budget and kept[-1] == n + 2  # the newest step is kept


def test_engine_decoding_drops_the_least_attended_entry_step_by_step():
    """TOVA's per-step form through the engine, against the model written out: after the
    prefill the layer keeps the top ``budget`` of the last query's attention averaged over
    every query head; each decoding step attends to what is kept plus itself and drops the
    entry its own head-averaged attention is lowest on (one set for every head)."""
    from tests.compress.reference import evicting_decode_attention, lowest, reference_logits, top_indices

    prompt, steps, budget = 60, 6, 20
    ids = prompt_ids(prompt + steps, seed=2)
    peaky = dict(initializer_range=0.2)
    final = {}

    def initial(layer, probs):
        kept = top_indices(probs[:, -1].mean(dim=0), budget)
        return [kept, kept]

    def evict(layer, held, probs, i):
        positions = held[0]
        drop = positions[lowest(torch.stack(probs).mean(dim=0))]
        final[layer] = [j for j in positions if j != drop]
        return [final[layer]] * 2

    expected = reference_logits(ids, evicting_decode_attention(prompt, initial, evict), **peaky)
    engine = tiny_engine(**peaky)
    cache = engine.new_sequence(f"tova(budget={budget})")
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    got = engine.teacher_force(cache, logits, ids[prompt:] + [0])
    torch.testing.assert_close(got, torch.log_softmax(expected[prompt - 1 :], -1), atol=1e-5, rtol=1e-5)
    assert [layer.key_positions().tolist() for layer in cache.layers] == [final[0], final[1]]
