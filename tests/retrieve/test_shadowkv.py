"""ShadowKV: rank-r pre-RoPE keys rebuilt for the chunks whose landmarks score best, values
from the offloaded tier, outlier and local chunks exact.

The reference (written out with loops below) follows the paper's definition on the tiny model
(tests/compress/reference.py): SVD of the context's pre-RoPE keys flattened over KV heads,
landmarks = chunk means of the post-RoPE keys, outliers = the chunks with the lowest minimum
cosine to their landmark; each decoding step, per KV head, the chunks with the largest
max-over-the-group softmax of ``q . landmark / sqrt(d)`` are rebuilt as ``U S V^T`` rows and
rotated at their positions; attention is exact over outliers + those + local + new tokens.
"""

import pytest
import torch

from tests.compress.reference import reference_logits
from tests.conftest import prompt_ids, tiny_engine

LISTED = "shadowkv(budget=16, rank=8, outliers=2, local=2)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def shadow_attention(prompt, budget, rank, chunk, outliers, local, log):
    """The reference model's attention: rows before ``prompt`` are the dense prefill; each
    later row (a decoding step) follows ShadowKV's definition. ``log`` collects
    ``(layer, row, kv head, chosen chunks)``."""

    def attention(layer, q, k, v, rope):
        n, d = q.shape[1], q.shape[-1]
        kv_heads, group = k.shape[0], q.shape[0] // k.shape[0]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        out = torch.zeros_like(qr)
        for i in range(prompt):  # the prefill is dense
            for h in range(q.shape[0]):
                p = torch.softmax(qr[h, i] @ kr[h // group, : i + 1].T / d**0.5, dim=-1)
                out[h, i] = p @ v[h // group, : i + 1]
        # low rank: SVD of [prompt, kv_heads * d] of the pre-RoPE context keys
        flat = torch.cat([k[h, :prompt] for h in range(kv_heads)], dim=1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        r = min(rank, *flat.shape)
        low = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        rebuilt = [rope(low[None, :, h * d : (h + 1) * d], torch.arange(prompt))[0] for h in range(kv_heads)]
        chunks = prompt // chunk - local
        for kv in range(kv_heads):
            marks, worst = [], []
            for c in range(chunks):
                block = kr[kv, c * chunk : (c + 1) * chunk]
                mark = block.mean(0)
                marks.append(mark)
                worst.append(min(float(torch.dot(x, mark) / (x.norm() * mark.norm())) for x in block))
            outlier = sorted(sorted(range(chunks), key=lambda c: worst[c])[:outliers])
            rest = [c for c in range(chunks) if c not in outlier]
            picked = budget // chunk
            for i in range(prompt, n):
                if picked >= len(rest):
                    chosen = rest
                else:
                    best = torch.zeros(len(rest))
                    for h in range(kv * group, (kv + 1) * group):
                        logits = torch.stack([qr[h, i] @ marks[c] for c in rest]) / d**0.5
                        best = torch.maximum(best, torch.softmax(logits, dim=0))
                    top = best.sort(descending=True).values
                    assert top[picked - 1] - top[picked] > 1e-6, "near tie: pick another prompt"
                    chosen = sorted(rest[j] for j in best.topk(picked).indices.tolist())
                log.append((layer, i, kv, chosen))
                exact = [t for c in outlier for t in range(c * chunk, (c + 1) * chunk)]
                exact += list(range(chunks * chunk, i + 1))  # local chunks and new tokens
                low_rows = [t for c in chosen for t in range(c * chunk, (c + 1) * chunk)]
                keys = torch.cat([kr[kv, exact], rebuilt[kv][low_rows]])
                values = torch.cat([v[kv, exact], v[kv, low_rows]])
                for h in range(kv * group, (kv + 1) * group):
                    p = torch.softmax(qr[h, i] @ keys.T / d**0.5, dim=-1)
                    out[h, i] = p @ values
        return out

    return attention


def shadow_logprobs(recipe, ids, prompt):
    engine = tiny_engine()
    sequence = engine.new_sequence(recipe)
    logits = engine.prefill(sequence, ids[:prompt], compress=True)
    return engine.teacher_force(sequence, logits, ids[prompt:] + [0]), sequence


@pytest.mark.parametrize("budget, rank, outliers, local", [(16, 8, 2, 2), (24, 160, 3, 1), (16, 3, 0, 4)])
def test_decoding_follows_the_papers_definition(budget, rank, outliers, local):
    prompt, steps = 120, 6
    ids = prompt_ids(prompt + steps, seed=3)
    log = []
    expected = reference_logits(ids, shadow_attention(prompt, budget, rank, 8, outliers, local, log))
    recipe = f"shadowkv(budget={budget}, rank={rank}, outliers={outliers}, local={local})"
    got, _ = shadow_logprobs(recipe, ids, prompt)
    torch.testing.assert_close(got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=2e-5, rtol=1e-5)
    dense = torch.log_softmax(reference_logits(ids)[prompt:], dim=-1)
    assert not torch.allclose(got[1:], dense, atol=1e-3)  # selection changed the result
    assert len({tuple(c) for *_, c in log}) > 2  # and it depends on the query


def test_equals_full_when_the_budget_covers_everything_at_full_rank():
    """Every chunk rebuilt at full rank (160 > kv_heads * d = 32): the rebuilt keys are the
    originals, so attention is dense attention."""
    engine = tiny_engine()
    ids = prompt_ids(160)
    full = engine.new_sequence("full")
    shadow = engine.new_sequence("shadowkv(budget=1.0, outliers=4)")
    logits = [engine.prefill(s, ids[:150], compress=True) for s in (full, shadow)]
    expected = engine.teacher_force(full, logits[0], ids[150:])
    got = engine.teacher_force(shadow, logits[1], ids[150:])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    index = shadow.layers[0].side["shadowkv.shadow"]
    pre = torch.matmul(index.u[:, None].expand(-1, 2, -1, -1), index.svt)  # [1, 2, m, d]
    back = tiny_engine().new_sequence("full")
    engine.prefill(back, ids[:150], compress=True)
    rotary = back.rotary(engine.config, 150, engine.trained_length)
    originals = rotary.rotate(back.layers[0].keys[:, :, : pre.shape[2]], -torch.arange(pre.shape[2]))
    torch.testing.assert_close(pre, originals, atol=1e-4, rtol=1e-4)


def test_full_keys_leave_the_accelerator_and_values_are_offloaded():
    """After the prefill the layer holds only outlier and local chunks (and, later, the new
    tokens); the accelerator tier holds U, S V^T, landmarks, chunk ids and positions; the
    values of the other chunks are counted on the offloaded tier only."""
    prompt, steps, chunk, outliers, local, rank = 120, 5, 8, 2, 2, 8
    kv_heads, d, f32 = 2, 16, 4
    ids = prompt_ids(prompt + steps)
    engine = tiny_engine()
    recipe = f"shadowkv(budget=16, rank={rank}, outliers={outliers}, local={local})"
    shadow = engine.generate_ids(ids[:prompt], recipe, max_new_tokens=steps)
    full = engine.generate_ids(ids[:prompt], "full", max_new_tokens=steps)
    chunks = prompt // chunk - local
    region = chunks * chunk
    sequence = engine.new_sequence(recipe)
    logits = engine.prefill(sequence, ids[:prompt], compress=True)
    exact = outliers * chunk + prompt - region
    assert [layer.num_entries for layer in sequence.layers] == [exact] * 2  # no full keys kept
    engine.teacher_force(sequence, logits, ids[prompt : prompt + steps])  # stores steps - 1
    capacity = sequence.layers[0].capacity  # the new tokens and the decoding reserve
    assert sequence.layers[0].num_entries == exact + steps - 1
    layer_bytes = 2 * kv_heads * capacity * d * f32 + kv_heads * (exact + steps - 1) * 4
    index_bytes = (region * rank + kv_heads * rank * d + kv_heads * (chunks - outliers) * d) * f32
    index_bytes += kv_heads * (chunks - outliers) * 8 + kv_heads * region * 4
    assert sequence.nbytes() == shadow.stats.kv_bytes == 2 * (layer_bytes + index_bytes)
    assert shadow.stats.kv_offloaded_bytes == 2 * kv_heads * region * d * f32
    assert shadow.stats.kv_bytes < 0.55 * full.stats.kv_bytes  # rank 8 of 32, values out
    assert full.stats.kv_offloaded_bytes == 0
    assert shadow.stats.kv_tokens == full.stats.kv_tokens  # nothing evicted: moved to a tier


def test_short_context_stays_dense():
    engine = tiny_engine()
    ids = prompt_ids(60)
    full = engine.generate_ids(ids, "full", max_new_tokens=4)
    short = engine.generate_ids(ids, "shadowkv(budget=8)", max_new_tokens=4)  # 7 chunks < 48 + 4
    assert short.token_ids == full.token_ids and short.stats.kv_bytes == full.stats.kv_bytes


@pytest.mark.parametrize("recipe", ["shadowkv(budget=16, outliers=2, local=2)", "a2ats(budget=16, window=16)"])
def test_a_multi_request_session_keeps_the_context_index(recipe):
    """The index is built at the end of the context; each question is appended and read
    exactly, then discarded: the next identical question gets the same answer and bytes."""
    engine = tiny_engine()
    context = prompt_ids(130, seed=4)
    session = engine.new_sequence(recipe)
    logits = engine.prefill(session, context, compress=True)
    mark, before = session.mark(), (session.nbytes(), session.offloaded_nbytes())
    answers = []
    for _ in range(2):
        logits = engine.prefill(session, prompt_ids(6, seed=5), compress=False)
        answers.append(engine.teacher_force(session, logits, prompt_ids(4, seed=6)))
        session.rollback(mark)
        assert (session.nbytes(), session.offloaded_nbytes()) == before
    torch.testing.assert_close(answers[0], answers[1], atol=0, rtol=0)


@pytest.mark.parametrize("recipe", ["shadowkv(budget=16, outliers=2, local=2)", "a2ats(budget=16, window=16)"])
def test_a_question_appended_after_the_context_reads_the_whole_context(recipe):
    """Prompt tokens appended after the context (a session's question) attend to every
    context entry, those moved out of the layer's storage included: at full rank (ShadowKV)
    or with the exact offloaded keys (A2ATS) their logits are the full cache's."""
    engine = tiny_engine()
    context, question = prompt_ids(130, seed=4), prompt_ids(6, seed=5)
    got = []
    for name in ("full", recipe):
        sequence = engine.new_sequence(name)
        engine.prefill(sequence, context, compress=True)
        got.append(engine.prefill(sequence, question, compress=False))
    torch.testing.assert_close(got[1], got[0], atol=1e-4, rtol=1e-4)
