"""InfiniRetri: the prompt is read chunk by chunk; after each chunk the layer keeps the entries
its window's attention retrieves, and the next chunk attends to those plus itself.

The reference model (tests/compress/reference.py) is written out with the chunked reading
done by loops: each chunk's rows attend to the entries kept so far and the chunk's own
earlier rows; after the chunk, every entry before the window is scored by the attention
probability of the window rows summed over all query heads, convolved with ``kernel`` ones,
and the best ``budget - window`` plus the window are kept (the same set for every head).
"""

import pytest
import torch

import kvlab
from kvlab.errors import RecipeError
from kvlab.recipe import parse_recipe
from kvlab.registry import resolve_budget
from tests.compress.reference import reference_logits
from tests.conftest import prompt_ids, tiny_model

LISTED = "infiniretri(budget=48, window=8)"
"""A setting where the method must change the result on a 120-token prompt of the tiny model."""


def chunked_engine(chunk):
    return kvlab.Engine(tiny_model(), None, progress=False, prefill_chunk=chunk)


def infiniretri_reference(chunks, budget, window, kernel, kept_log):
    """Chunked reading with eviction between chunks, written out; ``kept_log[layer]`` gets the
    positions kept after the prompt."""

    def attention(layer, q, k, v, rope):
        n = q.shape[1]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        group = q.shape[0] // k.shape[0]
        out = torch.zeros_like(q)
        kept = []
        scale = q.shape[-1] ** -0.5

        def probs_of(h, i, entries):
            logits = torch.stack([qr[h, i] @ kr[h // group, j] for j in entries]) * scale
            return torch.softmax(logits, dim=-1)

        for a, b in chunks:
            for i in range(a, b):
                entries = kept + list(range(a, i + 1))
                for h in range(q.shape[0]):
                    out[h, i] = probs_of(h, i, entries) @ v[h // group, entries]
            entries = kept + list(range(a, b))
            size = resolve_budget(budget, len(entries))
            if len(entries) <= size:
                kept = entries
                continue
            w = min(window, b - a, size)
            votes = torch.zeros(len(entries) - w)
            for i in range(b - w, b):
                visible = [j for j in entries if j <= i]
                for h in range(q.shape[0]):
                    p = probs_of(h, i, visible)
                    for slot, j in enumerate(visible):
                        if slot < len(votes):
                            votes[slot] += p[slot]
            r = kernel // 2
            smooth = torch.stack([votes[max(0, s - r) : s + r + 1].sum() for s in range(len(votes))])
            ordered = smooth.sort(descending=True).values
            top = size - w
            assert ordered[top - 1] - ordered[top] > 1e-6, "near tie: pick another prompt"
            chosen = sorted(smooth.topk(top).indices.tolist())
            kept = [entries[s] for s in chosen] + entries[len(entries) - w :]
        kept_log[layer] = kept
        for i in range(chunks[-1][1], n):  # decoding rows: the kept entries and the new ones
            entries = kept + list(range(chunks[-1][1], i + 1))
            for h in range(q.shape[0]):
                out[h, i] = probs_of(h, i, entries) @ v[h // group, entries]
        return out

    return attention


@pytest.mark.parametrize("budget, window, kernel", [(24, 8, 5), (30, 4, 3)])
def test_each_chunk_reads_what_the_previous_chunks_retrieved(budget, window, kernel):
    prompt, steps, chunk = 120, 4, 40
    ids = prompt_ids(prompt + steps, seed=4)
    engine = chunked_engine(chunk)
    assert engine.chunks(prompt) == [(0, 40), (40, 80), (80, 120)]
    kept = {}
    expected = reference_logits(ids, infiniretri_reference(engine.chunks(prompt), budget, window, kernel, kept))
    seq = engine.new_sequence(f"infiniretri(budget={budget}, window={window}, kernel={kernel})")
    logits = engine.prefill(seq, ids[:prompt], compress=True)
    assert [seq.layers[i].positions.tolist() for i in range(2)] == [kept[0], kept[1]]
    got = engine.teacher_force(seq, logits, ids[prompt:] + [0])  # row 0: the prompt's logits
    torch.testing.assert_close(got, torch.log_softmax(expected[prompt - 1 :], dim=-1), atol=1e-5, rtol=1e-5)
    assert all(len(k) == budget for k in kept.values())


def test_between_chunks_differs_from_one_compression_at_the_end():
    """The same budget applied once after a single chunk keeps other entries: the chunked
    reading is not a one-shot selection."""
    ids = prompt_ids(120, seed=4)
    chunked, whole = chunked_engine(40), chunked_engine(1024)
    kept = []
    for engine in (chunked, whole):
        seq = engine.new_sequence("infiniretri(budget=24, window=8)")
        engine.prefill(seq, ids, compress=True)
        kept.append([layer.positions.tolist() for layer in seq.layers])
    assert kept[0] != kept[1]


def test_budget_covering_everything_is_full_and_bytes_follow_the_budget():
    ids = prompt_ids(120, seed=4)
    engine = chunked_engine(40)
    full = engine.generate_ids(ids, "full", max_new_tokens=6)
    roomy = engine.generate_ids(ids, "infiniretri(budget=1.0)", max_new_tokens=6)
    assert roomy.token_ids == full.token_ids
    seq, ref = engine.new_sequence("infiniretri(budget=24, window=8)"), engine.new_sequence("full")
    for s in (seq, ref):
        engine.prefill(s, ids, compress=True)
    entry = 2 * 2 * 16 * 4  # keys + values of one entry, 2 KV heads, head_dim 16, fp32
    # kept entries, plus one int32 position per kept entry (shared by the heads)
    assert seq.nbytes() == 2 * 24 * (entry + 4)
    assert ref.nbytes() == 2 * 120 * entry


def test_even_kernel_is_refused():
    with pytest.raises(RecipeError, match="must be odd"):
        parse_recipe("infiniretri(kernel=4)")
