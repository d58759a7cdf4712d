"""RetrievalAttention: sinks + recent exact, the rest by vector retrieval, merged by log-sum-exp.

The engine-level tests compare kvlab's decoding log-probabilities with the model written out
(tests/compress/reference.py) whose decoding rows attend, per query head, to the first
``sink`` entries, the last ``recent`` entries (the step's own key included) and the
``budget`` keys of highest ``q . k`` among the others, found by brute force: what an exact
index (``index="flat"``, or IVF scanning every list) must give.
"""

import math

import faiss
import pytest
import torch

from kvlab.engine.kernels import merge_partials, partial_attention
from kvlab.registry import resolve_budget
from kvlab.retrieve.retrieval_attention import INDEX_KEY
from tests.compress.reference import causal_softmax_attention, reference_logits
from tests.conftest import prompt_ids, tiny_engine

LISTED = "retrieval_attention(budget=8, sink=4, recent=16, index='flat')"
"""A setting where the method must change the result on a 120-token prompt of the tiny model."""


def test_lse_merge_of_disjoint_partial_attentions_is_attention_over_their_union():
    torch.manual_seed(0)
    logits, values = torch.randn(2, 4, 3, 40), torch.randn(2, 2, 40, 8)  # GQA: 4 query heads
    split = torch.randperm(40)
    a, b, c = split[:7], split[7:25], split[25:]
    parts = [partial_attention(logits[..., s], values[:, :, s]) for s in (a, b, c)]
    whole = torch.softmax(logits, -1) @ values.repeat_interleave(2, 1)
    torch.testing.assert_close(merge_partials(parts), whole, atol=1e-6, rtol=1e-5)
    # a part with nothing allowed weighs nothing
    empty = partial_attention(torch.full((2, 4, 3, 5), float("-inf")), torch.randn(2, 2, 5, 8))
    torch.testing.assert_close(merge_partials(parts + [empty]), whole, atol=1e-6, rtol=1e-5)


def retrieval_reference(prompt, budget, sink, recent, log):
    """Decoding rows attend to sinks + recent + each query head's exact top-``budget`` by
    ``q . k`` among the other keys, written out with loops."""

    def attention(layer, q, k, v, rope):
        n = q.shape[1]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        out = causal_softmax_attention(qr, kr, v)
        group = q.shape[0] // k.shape[0]
        for i in range(prompt, n):
            entries = i + 1
            top = resolve_budget(budget, entries)
            if sink + recent + top >= entries:
                continue
            for h in range(q.shape[0]):
                keys = kr[h // group, :entries]
                middle = list(range(sink, entries - recent))
                dots = torch.stack([qr[h, i] @ keys[j] for j in middle])
                ordered = dots.sort(descending=True).values
                assert ordered[top - 1] - ordered[top] > 1e-5, "near tie: pick another prompt"
                chosen = [middle[j] for j in dots.topk(top).indices.tolist()]
                log.append((layer, i, h, chosen))
                index = sorted(list(range(sink)) + chosen + list(range(entries - recent, entries)))
                logits = qr[h, i] @ keys[index].T / q.shape[-1] ** 0.5
                out[h, i] = torch.softmax(logits, dim=-1) @ v[h // group, index]
        return out

    return attention


def decode_logprobs(recipe, ids, prompt):
    engine = tiny_engine()
    cache = engine.new_sequence(recipe)
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    return engine.teacher_force(cache, logits, ids[prompt:] + [0]), cache


@pytest.mark.parametrize(
    "index", ["index='flat'", "index='ivf', lists=4, probe=4"]  # IVF scanning every list is exact
)
def test_exact_index_gives_exact_top_k_attention_merged_with_sinks_and_recent(index):
    prompt, steps, budget, sink, recent = 97, 9, 8, 4, 16
    ids = prompt_ids(prompt + steps, seed=2)
    log = []
    expected = reference_logits(ids, retrieval_reference(prompt, budget, sink, recent, log))
    recipe = f"retrieval_attention(budget={budget}, sink={sink}, recent={recent}, {index})"
    got, _ = decode_logprobs(recipe, ids, prompt)
    torch.testing.assert_close(
        got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=1e-5, rtol=1e-5
    )
    assert len(log) == 2 * steps * 4
    dense = torch.log_softmax(reference_logits(ids)[prompt:], dim=-1)
    assert not torch.allclose(got[1:], dense, atol=1e-3)  # retrieval changed the result


def test_ivf_centroids_are_trained_on_the_prefill_queries():
    """The IVF centroids are faiss k-means centroids of the sampled prefill queries (not of
    the keys); the sample is dropped once they are trained, and every key not in the static
    part is filed in the index."""
    prompt, sink, recent = 97, 4, 16
    ids = prompt_ids(prompt + 2, seed=3)
    engine = tiny_engine()
    cache = engine.new_sequence(f"retrieval_attention(budget=8, sink={sink}, recent={recent}, lists=4, probe=1)")
    logits = engine.prefill(cache, ids[:prompt], compress=True)
    samples = [layer.side[INDEX_KEY].queries.clone() for layer in cache.layers]
    assert samples[0].shape == (1, 2, 2 * prompt, 16)  # both query heads of each KV head
    engine.teacher_force(cache, logits, ids[prompt:] + [0])
    for layer, sample in zip(cache.layers, samples):
        index = layer.side[INDEX_KEY]
        assert index.queries is None and index.end == prompt + 2 - recent
        for h in range(2):
            ivf = faiss.extract_index_ivf(index.indexes[0][h])
            assert ivf.nlist == 4 and ivf.nprobe == 1 and ivf.ntotal == index.end - sink
            mine = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 4, faiss.METRIC_INNER_PRODUCT)
            mine.train(sample[0, h].numpy())
            got = ivf.quantizer.reconstruct_n(0, 4)
            torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(mine.quantizer.reconstruct_n(0, 4)))
            keys = layer.keys[0, h].numpy()
            on_keys = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 4, faiss.METRIC_INNER_PRODUCT)
            on_keys.train(keys)
            assert not torch.allclose(torch.from_numpy(got), torch.from_numpy(on_keys.quantizer.reconstruct_n(0, 4)))


def test_sampled_queries_are_rotated_and_capped():
    engine = tiny_engine()
    ids = prompt_ids(97, seed=3)
    cache = engine.new_sequence("retrieval_attention(train_queries=50)")
    engine.prefill(cache, ids, compress=True)
    index = cache.layers[0].side[INDEX_KEY]
    assert index.queries.shape == (1, 2, 50, 16)
    assert cache.nbytes() - engine.new_sequence("full").nbytes() >= 0


def test_budget_covering_everything_is_full_attention():
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, "full", max_new_tokens=6)
    roomy = engine.generate_ids(ids, "retrieval_attention(budget=1.0, sink=4, recent=16)", max_new_tokens=6)
    assert roomy.token_ids == full.token_ids
    sparse = engine.generate_ids(ids, LISTED, max_new_tokens=6)
    assert sparse.token_ids != full.token_ids


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_bytes_are_the_serialized_faiss_indexes(kind):
    """Bytes beyond the full cache are the faiss indexes' serialized size per (layer, KV
    head); each holds a copy of its ``n - sink - recent`` keys (fp32)."""
    prompt, sink, recent, d = 97, 4, 16, 16
    ids = prompt_ids(prompt + 5, seed=3)
    recipe = f"retrieval_attention(budget=8, sink={sink}, recent={recent}, index='{kind}', lists=2)"
    engine = tiny_engine()
    ra, full = engine.new_sequence(recipe), engine.new_sequence("full")
    for cache in (ra, full):
        logits = engine.prefill(cache, ids[:prompt], compress=True)
        engine.teacher_force(cache, logits, ids[prompt:] + [0])
    indexed = prompt + 5 - recent - sink  # the last step's key included
    serialized = sum(
        len(faiss.serialize_index(ix))
        for layer in ra.layers for row in layer.side[INDEX_KEY].indexes for ix in row
    )
    assert ra.nbytes() - full.nbytes() == serialized
    assert serialized >= 2 * 2 * indexed * d * 4
    assert serialized < 2 * 2 * (indexed * (d * 4 + 8) + 2 * d * 4 + 1024)
    assert [layer.num_entries for layer in ra.layers] == [prompt + 5] * 2  # kept whole


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_rollback_removes_the_keys_indexed_since_the_mark(kind):
    """A session rolls a request's tokens back: keys the index took in since then (now in
    the recent window again, or gone) leave it, so decoding again gives the same result."""
    engine = tiny_engine()
    ids = prompt_ids(120, seed=2)
    recipe = f"retrieval_attention(budget=8, sink=4, recent=16, index='{kind}')"
    seq = engine.new_sequence(recipe)
    logits = engine.prefill(seq, ids[:60], compress=True)
    mark = seq.mark()
    first = engine.teacher_force(seq, logits, ids[60:90])
    seq.rollback(mark)
    assert seq.layers[0].side[INDEX_KEY].end <= 60
    again = engine.teacher_force(seq, logits, ids[60:90])
    torch.testing.assert_close(again, first, atol=1e-6, rtol=1e-6)


def test_ivf_search_effort_follows_the_budget():
    """The lists an IVF search probes follow the budget (``max(probe, ceil(scan * k / mean
    list length))``): a larger budget scans more keys and finds all its ``k`` (a fixed
    ``probe`` scans the same lists at every budget, so 1/8 and 1/4 read the same keys); where
    ``scan * k`` reaches every key, every list is probed (the search is exact)."""
    prompt = 300
    ids = prompt_ids(prompt + 2, seed=3)
    engine = tiny_engine()
    scanned, found, logprobs = [], [], []
    g = torch.Generator().manual_seed(0)
    for budget in (0.0625, 0.125, 0.25):
        seq = engine.new_sequence(f"retrieval_attention(budget={budget}, sink=4, recent=16, lists=8, probe=1)")
        logits = engine.prefill(seq, ids[:prompt], compress=True)
        logprobs.append(engine.teacher_force(seq, logits, ids[prompt:] + [0]))
        index = seq.layers[0].side[INDEX_KEY]
        scanned.append(index.scanned)  # the last decoding step's search, 2 KV heads x 2 query heads
        k = resolve_budget(budget, seq.layers[0].num_entries)
        with torch.inference_mode():
            ids_found = index.search(torch.randn(1, 4, 1, 16, generator=g), k)
        found.append(int((ids_found >= 0).sum()))
        assert found[-1] == 4 * k  # every query head gets its k keys
        nlist = faiss.extract_index_ivf(index.indexes[0][0]).nlist
        mean_list = (index.end - index.start) / nlist
        assert index.lists_to_probe(k, nlist) == min(nlist, max(1, math.ceil(4.0 * k / mean_list)))
    assert scanned[0] < scanned[1] < scanned[2]
    assert found[0] < found[1] < found[2]
    assert index.lists_to_probe(k, nlist) == nlist  # 4 x 1/4 of the keys: every list
    assert not torch.allclose(logprobs[1], logprobs[2], atol=1e-4)  # 1/8 and 1/4 differ


def test_a_kv_head_gathers_its_query_heads_entries_once():
    """``kv_head_union``: each KV head's union of its query heads' entries, each entry once
    (``-1``: none), and each query head reads exactly its own entries of it."""
    from kvlab.retrieve.base import kv_head_union

    found = torch.tensor([[[5, 2, 9], [9, 5, -1], [1, 2, 3], [3, 2, 1]]])  # 4 query heads, 2 KV heads
    union, read = kv_head_union(found, 2, 12)
    assert union.shape == (1, 2, 3)  # the largest union: {2, 5, 9} and {1, 2, 3}
    assert union[0].tolist() == [[2, 5, 9], [1, 2, 3]]
    assert read[0].tolist() == [[True, True, True], [False, True, True],
                                [True, True, True], [True, True, True]]
    found = torch.tensor([[[4, -1], [-1, -1], [7, 0], [0, 7]]])
    union, read = kv_head_union(found, 2, 12)
    assert union.shape == (1, 2, 2) and union[0, 1].tolist() == [0, 7]
    assert union[0, 0, 0] == 4 and read[0, :2].tolist() == [[True, False], [False, False]]
