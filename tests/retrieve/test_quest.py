"""Quest: page bounds are upper bounds, selection is per query head, attention is exact on it.

The engine-level tests compare kvlab's decoding log-probabilities with the model written out
(tests/compress/reference.py) whose decoding rows attend exactly to the pages Quest's
definition selects: every page of ``page`` entries, the partial last page (the newest tokens)
included, is scored ``sum_i max(q_i M_i, q_i m_i)`` with the min ``m`` and max ``M`` of its
rotated keys, each query head reads its ``max(3, budget // page)`` best pages.
"""

import pytest
import torch

from kvlab.registry import resolve_budget
from kvlab.retrieve.quest import page_min_max, page_scores
from tests.compress.reference import causal_softmax_attention, reference_logits
from tests.conftest import prompt_ids, tiny_engine


LISTED = "quest(budget=32, page=8, dense_layers=0)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def test_page_score_bounds_every_dot_product_in_the_page():
    torch.manual_seed(1)
    keys, q = torch.randn(1, 2, 64, 8), torch.randn(1, 4, 1, 8)
    mins, maxs = page_min_max(keys, 16)
    bound = page_scores(q, mins, maxs)  # [1, 4, 4]
    for h in range(4):
        dots = (q[0, h, 0] @ keys[0, h // 2].T).reshape(4, 16)
        assert torch.all(bound[0, h] >= dots.amax(dim=1) - 1e-5)


def quest_attention(prompt, budget, page, dense_layers, log, sink=0, recent=0):
    """The reference model's attention: rows before ``prompt`` are the dense prefill; each
    later row (a decoding step) attends per query head to its best pages by the definition,
    written out with loops, plus the first ``sink`` and last ``recent`` entries (each entry
    read once). ``log`` collects ``(layer, row, head, chosen pages, pages)``."""

    def attention(layer, q, k, v, rope):
        n = q.shape[1]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        out = causal_softmax_attention(qr, kr, v)
        if layer < dense_layers:
            return out
        group = q.shape[0] // k.shape[0]
        for i in range(prompt, n):
            entries = i + 1  # the step's own key is in the cache
            pages = max(3, resolve_budget(budget, entries) // page)
            if pages * page >= entries:
                continue
            for h in range(q.shape[0]):
                keys = kr[h // group, :entries]
                bounds = []
                for start in range(0, entries, page):
                    block = keys[start : start + page]
                    hi, lo = block.amax(0), block.amin(0)
                    bounds.append(torch.maximum(qr[h, i] * hi, qr[h, i] * lo).sum())
                scores = torch.stack(bounds)
                top, rest = scores.sort(descending=True).values[pages - 1 : pages + 1]
                assert top - rest > 1e-5, "near tie between pages: pick another prompt"
                chosen = sorted(scores.topk(pages).indices.tolist())
                log.append((layer, i, h, chosen, len(bounds)))
                read = {j for p in chosen for j in range(p * page, min(p * page + page, entries))}
                read |= set(range(min(sink, entries))) | set(range(max(0, entries - recent), entries))
                index = torch.tensor(sorted(read))
                logits = qr[h, i] @ keys[index].T / q.shape[-1] ** 0.5
                out[h, i] = torch.softmax(logits, dim=-1) @ v[h // group, index]
        return out

    return attention


def quest_logprobs(recipe, ids, prompt):
    """kvlab's log-probabilities of the rows ``prompt - 1 .. len(ids) - 1``: the prompt
    prefilled, the rest teacher-forced one decoding step at a time."""
    engine = tiny_engine()
    cache = engine.new_sequence(recipe)
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    return engine.teacher_force(cache, logits, ids[prompt:] + [0]), cache


@pytest.mark.parametrize("page, dense_layers", [(8, 0), (8, 1), (16, 0)])
def test_decoding_attends_exactly_to_the_best_pages_newest_page_included(page, dense_layers):
    prompt, steps = 97, 9
    ids = prompt_ids(prompt + steps, seed=3)
    log = []
    expected = reference_logits(ids, quest_attention(prompt, 32, page, dense_layers, log))
    got, _ = quest_logprobs(f"quest(budget=32, page={page}, dense_layers={dense_layers})", ids, prompt)
    torch.testing.assert_close(
        got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=1e-5, rtol=1e-5
    )
    assert log and {layer for layer, *_ in log} == set(range(dense_layers, 2))
    # the test is meaningful: some heads read the partial last page (the newest tokens) ...
    newest = [(i, h) for _, i, h, chosen, pages in log if (i + 1) % page and pages - 1 in chosen]
    assert newest
    # ... and some pass over it, and selection changed the result: not dense attention
    assert any(pages - 1 not in chosen for *_, chosen, pages in log)
    dense = torch.log_softmax(reference_logits(ids)[prompt:], dim=-1)
    assert not torch.allclose(got[1:], dense, atol=1e-3)


def test_page_bounds_are_stored_per_page_and_counted():
    """Bytes beyond the full cache are the min and max of every page, the partial last one
    included (fp32 ``[kv_heads, pages, d]`` each), in each non-dense layer (no decoding
    reserve under 16 pages)."""
    prompt, page, d, kv_heads = 97, 8, 16, 2
    ids = prompt_ids(prompt + 12, seed=3)
    recipe = f"quest(budget=32, page={page}, dense_layers=1)"
    engine = tiny_engine()
    for steps in (1, 7, 8, 12):
        quest, full = engine.new_sequence(recipe), engine.new_sequence("full")
        for cache in (quest, full):
            logits = engine.prefill(cache, ids[:prompt], compress=True)
            engine.teacher_force(cache, logits, ids[prompt : prompt + steps] + [0])
        entries = prompt + steps  # the last step's key included
        extra = quest.nbytes() - full.nbytes()
        assert extra == 2 * kv_heads * -(-entries // page) * d * 4, steps
        assert [layer.num_entries for layer in quest.layers] == [entries] * 2  # kept whole


def test_engine_quest_dense_layers_budget_and_bytes():
    engine = tiny_engine()
    ids = prompt_ids(160)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    roomy = engine.generate_ids(ids, "quest(budget=1.0, page=16, dense_layers=0)", max_new_tokens=8)
    assert roomy.token_ids == full.token_ids
    # the first two layers are dense: with a 2-layer model the default never selects
    assert engine.generate_ids(ids, "quest(budget=32)", max_new_tokens=8).token_ids == full.token_ids
    sparse = engine.generate_ids(ids, "quest(budget=32, page=8, dense_layers=0)", max_new_tokens=8)
    assert sparse.token_ids != full.token_ids
    assert sparse.stats.kv_tokens == full.stats.kv_tokens  # the cache is kept whole
    assert sparse.stats.kv_bytes > full.stats.kv_bytes  # plus the page bounds


@pytest.mark.parametrize("sink, recent", [(4, 0), (0, 12), (5, 20)])
def test_sink_and_recent_entries_are_always_read_once(sink, recent):
    """The remedy (TokenSelect / RetrievalAttention's sinks and recent window): the best
    pages plus the first ``sink`` and last ``recent`` entries, an entry a page holds counted
    once; the reference reads the union."""
    prompt, steps, page = 97, 9, 8
    ids = prompt_ids(prompt + steps, seed=3)
    log = []
    expected = reference_logits(ids, quest_attention(prompt, 32, page, 0, log, sink, recent))
    recipe = f"quest(budget=32, page={page}, dense_layers=0, sink={sink}, recent={recent})"
    got, _ = quest_logprobs(recipe, ids, prompt)
    torch.testing.assert_close(
        got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=1e-5, rtol=1e-5
    )
    # meaningful: some heads did not choose page 0 / the newest pages, and the result differs
    plain, _ = quest_logprobs(f"quest(budget=32, page={page}, dense_layers=0)", ids, prompt)
    assert not torch.allclose(got[1:], plain[1:], atol=1e-4)
    if sink:
        assert any(0 not in chosen for *_, chosen, _ in log)
    if recent:
        assert any(pages - 2 not in chosen for *_, chosen, pages in log)


def test_sink_and_recent_default_off_is_the_published_method():
    prompt, steps = 97, 9
    ids = prompt_ids(prompt + steps, seed=3)
    plain, _ = quest_logprobs("quest(budget=32, page=8, dense_layers=0)", ids, prompt)
    off, _ = quest_logprobs("quest(budget=32, page=8, dense_layers=0, sink=0, recent=0)", ids, prompt)
    assert torch.equal(plain, off)


def test_partial_page_bound_is_over_its_real_entries_only():
    """The newest (partial) page is bounded over the entries it has, not over
    stale storage beyond them, on a layer grown step by step."""
    torch.manual_seed(0)
    from kvlab.engine.cache import LayerKV
    from kvlab.retrieve.quest import Quest

    keys = torch.randn(1, 2, 45, 8)
    layer = LayerKV()
    layer.append(keys[:, :, :40], keys[:, :, :40], torch.arange(40))
    for t in range(40, 45):
        layer.append(keys[:, :, t : t + 1], keys[:, :, t : t + 1], torch.tensor([t]))
    q = torch.randn(1, 4, 1, 8)
    got = Quest(page=16).scores(q, layer)
    mins, maxs = page_min_max(keys, 16)
    torch.testing.assert_close(got, page_scores(q, mins, maxs))


def written_out_bounds(keys, page):
    """Min and max ``[b, h, pages, d]`` of each page of ``keys``, one page at a time."""
    n = keys.shape[2]
    mins = [keys[:, :, s : s + page].amin(dim=2) for s in range(0, n, page)]
    maxs = [keys[:, :, s : s + page].amax(dim=2) for s in range(0, n, page)]
    return torch.stack(mins, dim=2), torch.stack(maxs, dim=2)


@pytest.mark.parametrize("prompt", [96, 97, 103])
def test_page_bounds_are_built_at_the_end_of_prefill_and_kept_per_token(prompt):
    """The end of the context prefill bounds every page of a selecting layer (the first
    decoding step builds nothing); each decoding step folds its token into its page's bounds
    (a page that fills, a page that starts); after a rollback the partial page is bounded
    again. Every time the bounds equal the written-out min/max of the stored keys."""
    page = 8
    ids = prompt_ids(prompt + 13, seed=3)
    engine = tiny_engine()
    seq = engine.new_sequence(f"quest(budget=32, page={page}, dense_layers=1)")
    logits = engine.prefill(seq, ids[:prompt], compress=True)
    dense, layer = seq.cache.layers
    assert "quest.page_bounds" not in dense.side  # a dense layer never selects
    index = layer.side["quest.page_bounds"]
    assert index.entries == prompt  # built by the prefill, partial page included
    for got, want in zip(index.bounds(), written_out_bounds(layer.keys, page)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    mark = seq.mark()
    engine.teacher_force(seq, logits, ids[prompt : prompt + 13])
    assert index is layer.side["quest.page_bounds"] and index.entries == layer.num_entries == prompt + 12
    for got, want in zip(index.bounds(), written_out_bounds(layer.keys, page)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    seq.rollback(mark)
    index = layer.side["quest.page_bounds"]
    with torch.inference_mode():  # as the engine runs it
        index.update(layer.keys)
    assert index.entries == prompt
    for got, want in zip(index.bounds(), written_out_bounds(layer.keys, page)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
