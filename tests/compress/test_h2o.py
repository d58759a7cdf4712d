"""H2O keeps the heavy hitters — entries with the most attention accumulated over every prompt
query — plus the most recent entries, per KV head."""

import pytest
import torch

from tests.layers import probs_of, random_layer, rotary
from tests.conftest import prefilled, prompt_ids, tiny_engine
from kvlab.compress import h2o
from kvlab.compress.h2o import H2O


LISTED = "h2o(budget=30)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def reference_keep(q, keys, budget, recent):
    """Sum every query's causal attention per key over the query heads of each KV head; keep
    the top ``budget - recent`` older entries plus the last ``recent``."""
    n, hq, hk = keys.shape[2], q.shape[1], keys.shape[1]
    rot = rotary(q.shape[-1])
    kept = []
    for kv in range(hk):
        total = torch.zeros(n)
        for h in range(kv * hq // hk, (kv + 1) * hq // hk):
            for i in range(n):
                total += probs_of(q[0, h, i], i, keys[0, kv], rot)
        heavy = total[: n - recent].topk(budget - recent).indices.tolist()
        kept.append(sorted(heavy + list(range(n - recent, n))))
    return kept


@pytest.mark.parametrize("recent_share, block", [(0.5, None), (0.25, 1), (0.0, 1 << 10)])
def test_keep_matches_the_reference(monkeypatch, recent_share, block):
    if block is not None:  # accumulating over query blocks changes nothing
        monkeypatch.setattr(h2o, "LOGIT_BLOCK", block)
    ctx, q = random_layer(n=40, seed=8)
    keys_before = ctx.layer.keys.clone()
    recent = round(recent_share * 16)
    expected = reference_keep(q, keys_before, 16, recent)
    H2O(budget=16, recent=recent_share).compress(q, ctx)
    assert ctx.layer.positions[0].tolist() == expected
    for h in range(2):
        torch.testing.assert_close(ctx.layer.keys[0, h], keys_before[0, h, expected[h]])


def test_every_query_votes_not_only_the_last():
    """An entry only early queries attend to is a heavy hitter, though the last queries
    (SnapKV's window, TOVA's last query) give it nothing special."""
    ctx, q = random_layer(n=40, seed=9)
    q[:, :, 12:18] = torch.randn(8)  # six early queries look for the same thing ...
    target = rotary(8).rotate(q[:, :1, 12:13], torch.tensor([12]))[0, 0, 0]
    ctx.layer.keys[:, :, 11] = 30 * target / target.norm()  # ... and find entry 11
    q[:, :, 18:] *= 0.01  # later queries look nowhere in particular
    H2O(budget=8, recent=0.5).compress(q, ctx)
    for head in ctx.layer.positions[0].tolist():
        assert 11 in head


def test_per_head_heavy_hitters_and_recent_tokens_in_the_engine():
    engine = tiny_engine()
    ids = prompt_ids(160)
    cache = prefilled(engine, "h2o(budget=40, recent=0.5)", ids)
    for layer in cache.layers:
        assert layer.positions.shape == (1, 2, 40)
        for head in layer.positions[0].tolist():
            assert head[-20:] == list(range(140, 160))
    engine.prefill_chunk = 64  # three chunks: every chunk's queries vote, as in one chunk
    chunked = prefilled(engine, "h2o(budget=40, recent=0.5)", ids)
    for one, three in zip(cache.layers, chunked.layers):
        assert torch.equal(one.positions, three.positions)
        torch.testing.assert_close(one.side[h2o.SCORES].scores, three.side[h2o.SCORES].scores)
    engine.prefill_chunk = 1024
    whole = engine.generate_ids(ids, "full", max_new_tokens=1).stats.kv_bytes
    small = engine.generate_ids(ids, "h2o(budget=0.25)", max_new_tokens=1).stats
    assert small.kv_tokens == 40
    # + int32 positions and the fp32 accumulated scores (kept for decoding), per head and layer
    assert small.kv_bytes == whole * 40 // 160 + 2 * (2 * 40) * 4 + 2 * (2 * 40) * 4


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    roomy = engine.generate_ids(ids, "h2o(budget=200)", max_new_tokens=8)  # never over budget
    assert roomy.token_ids == full.token_ids and roomy.stats.kv_tokens == full.stats.kv_tokens
    # the same entries, plus the fp32 accumulated score H2O keeps per entry and head
    assert roomy.stats.kv_bytes == full.stats.kv_bytes + 2 * 2 * 107 * 4


def test_engine_keeps_the_heavy_hitters_of_every_eager_query_plus_the_recent_entries():
    """Through the engine (two prefill chunks), against the eager model's attention: the
    probabilities of *every* prompt query summed per entry and over the query heads of each
    KV head; the top ``budget - recent`` older entries plus the ``recent`` newest. Decoding
    then holds the cache size and always keeps the newest ``recent`` entries."""
    from tests.compress.reference import assert_top_k, eager_run, head_positions

    n, budget, recent = 120, 40, 10
    ids = prompt_ids(n, seed=2)
    peaky = dict(initializer_range=0.2)  # heads that differ clearly (a GQA mix-up shows)
    run = eager_run(ids, **peaky)
    engine = tiny_engine(**peaky)
    engine.prefill_chunk = 64  # two chunks: 0..63 and 64..119, both observed
    cache = engine.new_sequence(f"h2o(budget={budget}, recent={recent / budget})")
    logits = engine.prefill(cache, ids, compress=True)
    for index, layer in enumerate(cache.layers):
        scores = run.grouped(run.probs[index].sum(dim=1), "sum")  # [Hkv, n]
        for kept, head_scores in zip(head_positions(layer), scores):
            assert kept[-recent:] == list(range(n - recent, n))
            assert_top_k(kept[:-recent], head_scores[: n - recent], budget - recent)
    engine.teacher_force(cache, logits, prompt_ids(6, seed=4))  # 5 decoding steps
    for layer in cache.layers:
        for kept in head_positions(layer):
            assert len(kept) == budget and kept[-recent:] == list(range(n + 5 - recent, n + 5))


@pytest.mark.parametrize("prompt, budget, recent", [(60, 20, 4), (40, 36, 0)])
def test_engine_decoding_evicts_the_lowest_accumulated_score_step_by_step(prompt, budget, recent):
    """H2O's per-step form through the engine, against the model written out: after the
    prefill each KV head keeps its top ``budget - recent`` accumulated scores plus the
    ``recent`` newest; every decoding step attends to what is kept plus itself, adds its
    attention (summed over the KV head's query heads) to the scores, and evicts the
    lowest-scored entry older than the ``recent`` newest (with none recent, a new entry
    competes at once with the score of its own step)."""
    from tests.compress.reference import evicting_decode_attention, lowest, reference_logits, top_indices
    from tests.compress.reference import head_positions

    steps = 8
    ids = prompt_ids(prompt + steps, seed=2)
    peaky = dict(initializer_range=0.2)
    scores = {}  # layer -> per KV head {position: accumulated score}

    def initial(layer, probs):
        total = probs.sum(dim=1)  # [Hq, prompt]
        per_kv = [total[0] + total[1], total[2] + total[3]]
        kept = [top_indices(s[: prompt - recent], budget - recent) + list(range(prompt - recent, prompt)) for s in per_kv]
        scores[layer] = [{j: float(s[j]) for j in row} for s, row in zip(per_kv, kept)]
        return kept

    def evict(layer, held, probs, i):
        kept = []
        for kv, positions in enumerate(held):
            acc = scores[layer][kv]
            acc[i] = 0.0
            for h in (2 * kv, 2 * kv + 1):
                for j, p in zip(positions, probs[h].tolist()):
                    acc[j] += p
            older = positions[: len(positions) - recent]
            drop = older[lowest(torch.tensor([acc[j] for j in older]))]
            del acc[drop]
            kept.append([j for j in positions if j != drop])
        return kept

    expected = reference_logits(ids, evicting_decode_attention(prompt, initial, evict), **peaky)
    engine = tiny_engine(**peaky)
    cache = engine.new_sequence(f"h2o(budget={budget}, recent={recent / budget})")
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    got = engine.teacher_force(cache, logits, ids[prompt:] + [0])
    torch.testing.assert_close(got, torch.log_softmax(expected[prompt - 1 :], -1), atol=1e-5, rtol=1e-5)
    for index, layer in enumerate(cache.layers):
        assert [sorted(h) for h in head_positions(layer)] == [sorted(s) for s in scores[index]]
