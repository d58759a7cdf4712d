"""TokenSelect: soft voting of all query heads, one top-k per layer, contiguous positions.

The engine tests compare kvlab's teacher-forced decoding log-probabilities with the model
written out (tests/compress/reference.py) whose decoding rows follow the paper's definition
with loops: candidates ``j`` in ``[n_init, n - n_local)``, votes
``S_j = sum_h softmax_j(q_h . k_j / sqrt(d))`` (RoPE at the original positions, as kvlab
scores), the top ``budget`` shared by all heads, attention over ``[0, n_init)`` + top +
last ``n_local`` with the keys and the query re-rotated at positions ``0 .. m-1`` (query at
``m - 1``, its own key's position).

The chunked-prefill tests write out the same rule per prefill chunk ``[a, b)`` of ``t``
tokens: candidates ``[n_init, min(b - n_local, a))`` (the local window is the last ``n_local``
entries and the whole chunk), votes summed over the chunk's queries and the heads, the chunk
attending to ``[0, n_init)`` + top + ``[min(b - n_local, a), b)`` at positions ``0 .. m-1``,
its row ``i`` at ``m - t + i`` and causal within the chunk.
"""

import pytest
import torch

import kvlab
from kvlab.registry import resolve_budget
from kvlab.retrieve import tokenselect
from tests.compress.reference import reference_logits, top_indices
from tests.conftest import prompt_ids, tiny_engine, tiny_model

LISTED = "tokenselect(budget=16, n_init=4, n_local=16)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""

SHARP = {"initializer_range": 0.2}
"""Larger random weights than the default: attention peaks, so the votes have no near ties."""


def tokenselect_attention(prompt, budget, n_init, n_local, dense_layers, threshold, log, chunks=(), vote="queries"):
    """The reference attention; ``log`` collects ``(layer, row, chosen, reused)`` per decoding
    row and ``(layer, (a, b), attended, query_positions)`` per prefill chunk ``(a, b)`` of
    ``chunks`` that selects (none: the prefill is dense), whose queries all vote, or with
    ``vote="mean"`` their mean (rotated queries averaged over the chunk)."""

    def attention(layer, q, k, v, rope):
        n, d = q.shape[1], q.shape[-1]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        scale = d ** -0.5
        group = q.shape[0] // k.shape[0]
        out = torch.softmax(
            (qr @ kr.repeat_interleave(group, 0).transpose(1, 2) * scale).masked_fill(
                torch.arange(n)[None, :] > torch.arange(n)[:, None], float("-inf")
            ), dim=-1,
        ) @ v.repeat_interleave(group, 0)
        if layer < dense_layers:
            return out
        for a, b in chunks:  # the prompt's prefill chunks: the chunk's entries are 0 .. b-1
            t, top = b - a, resolve_budget(budget, b)
            local_start = min(b - n_local, a)
            if n_init + top >= local_start:
                continue  # no more candidates than the budget: dense
            candidates = list(range(n_init, local_start))
            votes = torch.zeros(len(candidates))
            voters = [qr[:, i] for i in range(a, b)] if vote == "queries" else [qr[:, a:b].mean(1)]
            for qi in voters:  # every query of the chunk (or its mean), every query head votes
                for h in range(q.shape[0]):
                    logits = kr[h // group, candidates] @ qi[h] * scale
                    votes += torch.softmax(logits, dim=0)
            chosen = [candidates[c] for c in top_indices(votes, top)]
            index = list(range(n_init)) + chosen + list(range(local_start, b))
            m = len(index)
            log.append((layer, (a, b), index, list(range(m - t, m))))
            for i in range(a, b):
                own = m - t + (i - a)  # the row's position: its own key's, index[own] == i
                seen = index[: own + 1]  # causal within the chunk
                for h in range(q.shape[0]):
                    qh = rope(q[h : h + 1, i : i + 1], torch.tensor([own]))[0, 0]
                    keys = rope(k[h // group : h // group + 1, seen], torch.arange(own + 1))[0]
                    p = torch.softmax(keys @ qh * scale, dim=0)
                    out[h, i] = p @ v[h // group, seen]
        previous = None  # (mean query, chosen)
        for i in range(prompt, n):
            entries = i + 1
            top = resolve_budget(budget, entries)
            if n_init + top + n_local >= entries:
                continue
            mean_query = q[:, i].mean(0)
            reused = False
            if threshold > 0 and previous is not None:
                cos = torch.dot(mean_query, previous[0]) / (mean_query.norm() * previous[0].norm())
                assert abs(float(cos) - threshold) > 1e-4, "near tie at the threshold"
                reused = float(cos) >= threshold
            if reused:
                chosen = previous[1]
            else:
                candidates = list(range(n_init, entries - n_local))
                votes = torch.zeros(len(candidates))
                for h in range(q.shape[0]):
                    logits = torch.stack([qr[h, i] @ kr[h // group, j] * scale for j in candidates])
                    votes += torch.softmax(logits, dim=0)
                chosen = [candidates[c] for c in top_indices(votes, top)]
            previous = (mean_query, chosen)
            log.append((layer, i, chosen, reused))
            index = list(range(n_init)) + chosen + list(range(entries - n_local, entries))
            m = len(index)
            for h in range(q.shape[0]):
                qh = rope(q[h : h + 1, i : i + 1], torch.tensor([m - 1]))[0, 0]
                keys = rope(k[h // group : h // group + 1, index], torch.arange(m))[0]
                p = torch.softmax(keys @ qh * scale, dim=0)
                out[h, i] = p @ v[h // group, index]
        return out

    return attention


def decode_logprobs(recipe, ids, prompt):
    """kvlab's log-probabilities of rows ``prompt - 1 ..``: prompt prefilled, rest teacher-forced."""
    engine = tiny_engine(**SHARP)
    cache = engine.new_sequence(recipe)
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    return engine.teacher_force(cache, logits, ids[prompt:] + [0]), cache


@pytest.mark.parametrize(
    "budget, n_init, n_local, dense_layers",
    [(16, 4, 16, 0), (0.25, 8, 8, 1), (24, 0, 1, 0)],
)
def test_decoding_follows_the_soft_vote_at_contiguous_positions(budget, n_init, n_local, dense_layers):
    prompt, steps = 97, 9
    ids = prompt_ids(prompt + steps, seed=3)
    log = []
    attention = tokenselect_attention(prompt, budget, n_init, n_local, dense_layers, 0.0, log)
    expected = reference_logits(ids, attention, **SHARP)
    recipe = f"tokenselect(budget={budget}, n_init={n_init}, n_local={n_local}, dense_layers={dense_layers})"
    got, _ = decode_logprobs(recipe, ids, prompt)
    torch.testing.assert_close(got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=1e-5, rtol=1e-5)
    assert {layer for layer, *_ in log} == set(range(dense_layers, 2))
    dense = torch.log_softmax(reference_logits(ids, **SHARP)[prompt:], dim=-1)
    assert not torch.allclose(got[1:], dense, atol=1e-3)


def test_selection_cache_reuses_the_previous_indices_when_the_query_barely_moves():
    prompt, steps, threshold = 97, 12, 0.3
    ids = prompt_ids(prompt + steps, seed=3)
    log = []
    attention = tokenselect_attention(prompt, 16, 4, 16, 0, threshold, log)
    expected = reference_logits(ids, attention, **SHARP)
    got, _ = decode_logprobs(f"tokenselect(budget=16, n_init=4, n_local=16, selection_cache={threshold})", ids, prompt)
    torch.testing.assert_close(got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=1e-5, rtol=1e-5)
    reused = [r for *_, r in log]
    assert any(reused) and not all(reused), reused  # both branches taken
    off, _ = decode_logprobs("tokenselect(budget=16, n_init=4, n_local=16)", ids, prompt)
    assert not torch.allclose(got, off, atol=1e-4)  # reuse changed what was attended


def test_equals_full_when_everything_fits():
    engine = tiny_engine()
    ids = prompt_ids(160)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    for recipe in ("tokenselect(budget=1.0)", "tokenselect(budget=16, n_init=64, n_local=128)",
                   "tokenselect(budget=8, n_init=4, n_local=8, dense_layers=2)"):
        assert engine.generate_ids(ids, recipe, max_new_tokens=8).token_ids == full.token_ids, recipe
    sparse = engine.generate_ids(ids, LISTED, max_new_tokens=8)
    assert sparse.token_ids != full.token_ids


def test_selection_cache_bytes_and_the_cache_kept_whole():
    """With the selection cache on, each layer keeps the previous mean query (fp32 ``[d]``)
    and the selected entries (int64 ``[k]``); without it nothing beyond the full cache."""
    prompt, d, k = 97, 16, 16
    ids = prompt_ids(prompt + 4, seed=3)
    engine = tiny_engine()
    caches = {}
    for recipe in ("full", "tokenselect(budget=16, n_init=4, n_local=16)",
                   "tokenselect(budget=16, n_init=4, n_local=16, selection_cache=0.9)"):
        cache = caches[recipe] = engine.new_sequence(recipe)
        logits = engine.prefill(cache, ids[:prompt], compress=True)
        engine.teacher_force(cache, logits, ids[prompt:] + [0])
    full, plain, cached = caches.values()
    assert plain.nbytes() == full.nbytes()
    assert cached.nbytes() - full.nbytes() == 2 * (d * 4 + k * 8)
    assert [layer.num_entries for layer in cached.layers] == [prompt + 4] * 2


# -- chunked prefill --------------------------------------------------------------------------
CHUNK = 24
CHUNKS = [(0, 24), (24, 48), (48, 72), (72, 97)]
"""The engine's prefill chunks of a 97-token prompt at ``prefill_chunk=24`` (the 1-token tail
joins the last chunk)."""


def chunked_run(recipe, ids, prompt, appended, monkeypatch=None):
    """kvlab's log-probabilities of rows ``prompt - 1 ..`` (the prompt prefilled in chunks of
    ``CHUNK``, the rest teacher-forced) and, with ``monkeypatch``, what each prefill chunk's
    selection attended: ``(layer, (a, b), attended entries, query positions)`` (the key
    positions were ``0 .. m-1``, checked here). ``appended``: the prompt's last chunk is
    appended after the context (a session's question, ``Phase.APPEND``)."""
    engine = kvlab.Engine(tiny_model(**SHARP), progress=False, prefill_chunk=CHUNK)
    assert engine.chunks(prompt) == CHUNKS
    calls = []
    if monkeypatch is not None:
        original = tokenselect.contiguous_attend

        def spy(q, ctx, entries):
            attend = ctx.attend

            def recorded(q, q_pos, keys, k_pos, values, allowed=None):
                m = entries.shape[1]
                assert k_pos.tolist() == list(range(m)) and allowed is None
                if q.shape[2] > 1:  # a prefill chunk (decoding steps: the tests above)
                    a = int(ctx.positions[0])
                    calls.append((ctx.index, (a, a + q.shape[2]), entries[0].tolist(), q_pos.tolist()))
                return attend(q, q_pos, keys, k_pos, values, allowed)

            ctx.attend = recorded
            return original(q, ctx, entries)

        monkeypatch.setattr(tokenselect, "contiguous_attend", spy)
    cache = engine.new_sequence(recipe)
    if appended:
        context = CHUNKS[-1][0]
        engine.prefill(cache, ids[:context], compress=True)
        logits = engine.prefill(cache, ids[context:prompt], compress=False)
    else:
        logits = engine.prefill(cache, ids[:prompt], compress=True)
    return engine.teacher_force(cache, logits, ids[prompt:] + [0]), calls


@pytest.mark.parametrize(
    "budget, n_init, n_local, dense_layers, appended, vote",
    [(16, 4, 16, 0, False, "queries"), (0.25, 8, 32, 1, False, "queries"), (12, 0, 1, 0, False, "queries"),
     (16, 4, 16, 0, True, "queries"), (12, 0, 1, 0, False, "mean")],
)
def test_prefill_chunks_vote_together_and_attend_at_contiguous_positions(
    budget, n_init, n_local, dense_layers, appended, vote, monkeypatch
):
    """Each prefill chunk after the first attends to exactly the entries and at exactly the
    positions the written-out rule gives (n_local below, at and above the chunk's 24 tokens;
    the last chunk also as a session's appended question); the prompt's logits, the cache
    the later layers built on it and the decoding after it follow the reference, and differ
    from a dense prefill's."""
    prompt, steps = 97, 4
    ids = prompt_ids(prompt + steps, seed=3)
    log = []
    attention = tokenselect_attention(prompt, budget, n_init, n_local, dense_layers, 0.0, log, CHUNKS, vote)
    expected = torch.log_softmax(reference_logits(ids, attention, **SHARP)[prompt - 1 :], dim=-1)
    recipe = (f"tokenselect(budget={budget}, n_init={n_init}, n_local={n_local}, dense_layers={dense_layers}, "
              f"prefill_vote={vote})")
    got, calls = chunked_run(recipe, ids, prompt, appended, monkeypatch)
    chunk_log = [entry for entry in log if isinstance(entry[1], tuple)]
    assert sorted(calls) == sorted(chunk_log)  # kvlab runs chunk by chunk, the reference layer by layer
    assert {layer for layer, *_ in chunk_log} == set(range(dense_layers, 2))
    assert len({span for _, span, *_ in chunk_log}) >= 2  # several chunks selected
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    dense_prefill, _ = chunked_run(recipe.replace(")", ", prefill_chunks=false)"), ids, prompt, appended)
    assert not torch.allclose(got[0], dense_prefill[0], atol=1e-3)  # the prompt's own logits
    dense = torch.log_softmax(reference_logits(ids, **SHARP)[prompt - 1 :], dim=-1)
    assert not torch.allclose(got, dense, atol=1e-3)


def test_prefill_chunks_false_keeps_the_prefill_dense():
    """``prefill_chunks=false`` is the decoding-only method: its prefill is the dense one."""
    prompt = 97
    ids = prompt_ids(prompt + 4, seed=3)
    log = []
    recipe = "tokenselect(budget=16, n_init=4, n_local=16, prefill_chunks=false)"
    expected = reference_logits(ids, tokenselect_attention(prompt, 16, 4, 16, 0, 0.0, log), **SHARP)
    got, _ = chunked_run(recipe, ids, prompt, appended=False)
    torch.testing.assert_close(got, torch.log_softmax(expected[prompt - 1 :], dim=-1), atol=1e-5, rtol=1e-5)


def test_a_prefill_method_computes_the_prefill_in_its_place(monkeypatch):
    """With a prefill method in the recipe, that method owns the prompt's attention:
    TokenSelect is not asked in prefill (the same prefill as ``prefill_chunks=false``) and
    still selects while decoding."""
    prompt = 97
    ids = prompt_ids(prompt + 4, seed=3)
    both, calls = chunked_run("ashape(sink=4, window=16) + tokenselect(budget=16, n_init=4, n_local=16)",
                              ids, prompt, appended=False, monkeypatch=monkeypatch)
    assert calls == []
    decoding_only, _ = chunked_run(
        "ashape(sink=4, window=16) + tokenselect(budget=16, n_init=4, n_local=16, prefill_chunks=false)",
        ids, prompt, appended=False,
    )
    torch.testing.assert_close(both, decoding_only, atol=0, rtol=0)
    ashape_only, _ = chunked_run("ashape(sink=4, window=16)", ids, prompt, appended=False)
    torch.testing.assert_close(both[0], ashape_only[0], atol=0, rtol=0)  # the same prefill
    assert not torch.allclose(both[1:], ashape_only[1:], atol=1e-4)  # decoding selects


def test_a_chunks_votes_summed_block_by_block_are_the_whole_vote(monkeypatch):
    """A long chunk votes in blocks of rows (bounded memory); the sum is the written-out
    ``sum_i sum_h softmax_j(q_hi . k_j * scaling)``."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 10, 16, generator=g)
    candidates = torch.randn(1, 2, 30, 16, generator=g)
    expected = torch.zeros(30)
    for i in range(10):
        for h in range(4):
            expected += torch.softmax(candidates[0, h // 2] @ q[0, h, i] * 0.25, dim=0)
    monkeypatch.setattr(tokenselect, "VOTE_BLOCK", 2 * 3 * 30)  # 2 KV heads x 3 of their 20 rows x 30
    torch.testing.assert_close(tokenselect.soft_votes(q, candidates, 0.25)[0], expected)
