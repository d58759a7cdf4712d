"""GemFilter: layer r's last query picks k tokens; the whole model re-prefills only those."""

import pytest
import torch

from tests.compress.reference import eager_run, reference_logits
from tests.conftest import assert_recipe_refused, prompt_ids, teacher_logprobs, tiny_engine

LISTED = "gemfilter(topk=40)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def written_out_selection(ids, layer, k, kernel=5):
    """The paper's filter, written out: s_j = sum over query heads of q_last . k_j (rotated,
    layer ``layer``), average-pooled (zero padding, ``kernel`` wide), top ``k``, sorted."""
    run = eager_run(ids)
    q, keys, g = run.rotated_queries[layer], run.keys[layer], run.group
    n = len(ids)
    scores = torch.zeros(n)
    for j in range(n):
        scores[j] = sum(float(q[h, n - 1] @ keys[h // g, j]) for h in range(q.shape[0]))
    half = kernel // 2
    pooled = torch.tensor([
        sum(float(scores[i]) for i in range(j - half, j + half + 1) if 0 <= i < n) / kernel
        for j in range(n)
    ])
    return sorted(pooled.topk(k).indices.tolist())


@pytest.mark.parametrize("fraction, layer, chunk", [(13 / 32, 0, 1024), (0.5, 1, 1024), (0.5, 1, 32)])
def test_equals_the_full_model_on_the_written_out_selection(fraction, layer, chunk):
    """kvlab's answer equals ``full`` run on the selected ids (fresh positions 0..k-1) and the
    written-out reference model on those ids; the probe may run in chunks."""
    ids, follow = prompt_ids(120, seed=3), prompt_ids(4, seed=9)
    keep = written_out_selection(ids, layer, 40)
    selected = [ids[i] for i in keep]
    engine = tiny_engine()
    engine.prefill_chunk = chunk
    logits, got = teacher_logprobs(engine, f"gemfilter(topk=40, filter_layer={fraction})", ids, follow)
    _, full = teacher_logprobs(engine, "full", selected, follow)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    expected = torch.log_softmax(reference_logits(selected + follow[:-1]), -1)[len(selected) - 1 :]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_equals_full_when_k_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, "full", max_new_tokens=6)
    for recipe in ("gemfilter(topk=120)", "gemfilter(topk=1.0)", "gemfilter"):  # default k=1024
        same = engine.generate_ids(ids, recipe, max_new_tokens=6)
        assert same.token_ids == full.token_ids
        assert same.stats.prefilled_per_layer == [120, 120]
    assert engine.generate_ids(ids, LISTED, max_new_tokens=6).token_ids != full.token_ids


def test_stats_show_the_probe_and_the_shorter_prefill_and_the_cache_shrinks():
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, "full", max_new_tokens=3).stats
    probe_r0 = engine.generate_ids(ids, "gemfilter(topk=40)", max_new_tokens=3).stats
    probe_r1 = engine.generate_ids(ids, "gemfilter(topk=0.25, filter_layer=0.5)", max_new_tokens=3).stats
    assert full.prefilled_per_layer == [120, 120]
    assert probe_r0.prefilled_per_layer == [120 + 40, 40]  # layer 0 probed, then re-prefilled
    assert probe_r1.prefilled_per_layer == [120 + 30, 120 + 30]
    assert probe_r0.kv_tokens == 40 + 2  # two decoded tokens cached after the k selected
    assert probe_r0.kv_bytes * 120 < full.kv_bytes * 43


def test_composes_with_a_compress_method_on_the_selected_tokens():
    ids, follow = prompt_ids(120, seed=3), prompt_ids(4, seed=9)
    selected = [ids[i] for i in written_out_selection(ids, 0, 40)]
    engine = tiny_engine()
    _, got = teacher_logprobs(engine, "gemfilter(topk=40) + snapkv(budget=20, window=4)", ids, follow)
    _, expected = teacher_logprobs(engine, "snapkv(budget=20, window=4)", selected, follow)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text, fragment", [
    ("gemfilter(kernel=4)", "odd"), ("gemfilter(topk=0)", "topk"),
    ("gemfilter(filter_layer=1.5)", "<= 1.0"),
])
def test_bad_parameters_are_refused(text, fragment):
    assert_recipe_refused(text, fragment)
