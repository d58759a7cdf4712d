"""A2ATS (training-free part): top-K by scores approximated from product-quantised pre-RoPE
keys under windowed RoPE, exact attention over them plus sinks and the window.

The reference below is written out with loops: k-means per KV head and sub-space on the
context's pre-RoPE keys outside sinks and window (Lloyd, from evenly spaced points), the score
of a key ``sum_s (R_window q)_s . C_s[code_s]``, per-query-head softmax summed over the group,
top ``budget`` per KV head, exact attention with true RoPE.
"""

import pytest
import torch

from kvlab.errors import RecipeError
from kvlab.retrieve.a2ats import kmeans
from tests.compress.reference import reference_logits
from tests.conftest import prompt_ids, tiny_engine

LISTED = "a2ats(budget=16, window=16, subspaces=4, codewords=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def lloyd(points, k, iterations):
    """k-means written out: ``points`` ``[m, e]`` -> centroids ``[k, e]``, codes ``[m]``."""
    m = points.shape[0]
    centroids = points[[round(i * (m - 1) / (k - 1)) for i in range(k)]].clone()

    def assign():
        return [min(range(k), key=lambda c: float(((x - centroids[c]) ** 2).sum())) for x in points]

    codes = assign()
    for _ in range(iterations):
        for c in range(k):
            members = [x for x, code in zip(points, codes) if code == c]
            if members:
                centroids[c] = torch.stack(members).mean(0)
        codes = assign()
    return centroids, codes


def test_kmeans_is_lloyd():
    torch.manual_seed(0)
    points = torch.randn(3, 50, 4)
    centroids, codes = kmeans(points, 6, 5)
    for g in range(3):
        ref_centroids, ref_codes = lloyd(points[g], 6, 5)
        assert codes[g].tolist() == ref_codes
        torch.testing.assert_close(centroids[g], ref_centroids, atol=1e-5, rtol=1e-5)


def a2ats_attention(prompt, budget, sink, window, subspaces, codewords, iterations, log):
    def attention(layer, q, k, v, rope):
        n, d = q.shape[1], q.shape[-1]
        kv_heads, group = k.shape[0], q.shape[0] // k.shape[0]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        qw = rope(q, torch.full((n,), window))  # WRoPE: every far key is `window` away
        width = d // subspaces
        out = torch.zeros_like(qr)
        for i in range(prompt):
            for h in range(q.shape[0]):
                p = torch.softmax(qr[h, i] @ kr[h // group, : i + 1].T / d**0.5, dim=-1)
                out[h, i] = p @ v[h // group, : i + 1]
        middle = list(range(sink, prompt - window))
        for kv in range(kv_heads):
            books = []
            for s in range(subspaces):
                points = k[kv, middle, s * width : (s + 1) * width]
                books.append(lloyd(points, min(codewords, len(middle)), iterations))
            for i in range(prompt, n):
                votes = torch.zeros(len(middle))
                for h in range(kv * group, (kv + 1) * group):
                    scores = torch.zeros(len(middle))
                    for j in range(len(middle)):
                        for s, (centroids, codes) in enumerate(books):
                            scores[j] += qw[h, i, s * width : (s + 1) * width] @ centroids[codes[j]]
                    votes += torch.softmax(scores / d**0.5, dim=0)
                if budget >= len(middle):
                    chosen = middle
                else:
                    top = votes.sort(descending=True).values
                    assert top[budget - 1] - top[budget] > 1e-7, "near tie: pick another prompt"
                    chosen = sorted(middle[j] for j in votes.topk(budget).indices.tolist())
                log.append((layer, i, kv, chosen))
                rows = list(range(sink)) + list(range(prompt - window, i + 1)) + chosen
                for h in range(kv * group, (kv + 1) * group):
                    p = torch.softmax(qr[h, i] @ kr[kv, rows].T / d**0.5, dim=-1)
                    out[h, i] = p @ v[kv, rows]
        return out

    return attention


@pytest.mark.parametrize("budget, sink, window, subspaces, codewords", [
    (16, 4, 16, 4, 32), (24, 0, 8, 8, 16), (8, 2, 32, 16, 16),
])
def test_decoding_follows_the_definition(budget, sink, window, subspaces, codewords):
    prompt, steps, iterations = 120, 5, 4
    # distinct tokens: in layer 0 a repeated token has the same pre-RoPE key, so its score
    # under WRoPE ties exactly (the position is decoupled) and top-K would be ambiguous
    ids = torch.randperm(256, generator=torch.Generator().manual_seed(5))[: prompt + steps].tolist()
    log = []
    expected = reference_logits(
        ids, a2ats_attention(prompt, budget, sink, window, subspaces, codewords, iterations, log)
    )
    engine = tiny_engine()
    sequence = engine.new_sequence(
        f"a2ats(budget={budget}, sink={sink}, window={window}, subspaces={subspaces}, "
        f"codewords={codewords}, iterations={iterations})"
    )
    logits = engine.prefill(sequence, ids[:prompt], compress=True)
    got = engine.teacher_force(sequence, logits, ids[prompt:] + [0])
    torch.testing.assert_close(got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=2e-5, rtol=1e-5)
    dense = torch.log_softmax(reference_logits(ids)[prompt:], dim=-1)
    assert not torch.allclose(got[1:], dense, atol=1e-3)
    assert len({tuple(c) for *_, c in log}) > 2


def test_equals_full_when_the_budget_covers_everything():
    engine = tiny_engine()
    ids = prompt_ids(160)
    full, a2ats = engine.new_sequence("full"), engine.new_sequence("a2ats(budget=1.0, window=16)")
    logits = [engine.prefill(s, ids[:150], compress=True) for s in (full, a2ats)]
    expected = engine.teacher_force(full, logits[0], ids[150:])
    got = engine.teacher_force(a2ats, logits[1], ids[150:])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_codes_on_the_accelerator_keys_and_values_offloaded():
    prompt, sink, window, subspaces, codewords = 120, 4, 16, 4, 8
    kv_heads, d, f32 = 2, 16, 4
    engine = tiny_engine()
    recipe = f"a2ats(budget=16, sink={sink}, window={window}, subspaces={subspaces}, codewords={codewords})"
    sequence = engine.new_sequence(recipe)
    engine.prefill(sequence, prompt_ids(prompt), compress=True)
    m = prompt - sink - window
    exact = sink + window
    assert [layer.num_entries for layer in sequence.layers] == [exact] * 2
    layer_bytes = 2 * kv_heads * exact * d * f32 + kv_heads * exact * 4
    index_bytes = kv_heads * m * subspaces + kv_heads * codewords * d * f32 + kv_heads * m * 4
    assert sequence.nbytes() == 2 * (layer_bytes + index_bytes)
    assert sequence.offloaded_nbytes() == 2 * 2 * kv_heads * m * d * f32
    assert sequence.mean_entries() == prompt  # nothing evicted: moved to the offloaded tier


def test_subspaces_must_divide_the_head_size():
    engine = tiny_engine()
    with pytest.raises(RecipeError, match="must divide the head size 16"):
        engine.generate_ids(prompt_ids(120), "a2ats(subspaces=3)", max_new_tokens=2)
