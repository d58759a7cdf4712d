"""LycheeDecode (training-free): retrieval heads choose blocks by full attention, sparse heads
reuse their KV head's blocks from the previous layer.

The engine-level test compares kvlab's decoding log-probabilities with the model written out
(tests/compress/reference.py) whose decoding rows follow the definition with loops: in layer
0 and in retrieval heads, full attention and a fresh choice of the ``budget // block`` blocks
of most attention probability (mean over the KV head's query heads); in sparse heads, exact
attention over the blocks the same KV head chose (or inherited) in the previous layer. The
calibration test recomputes the recall of reuse from the written-out model.
"""

import pytest
import torch

from kvlab.compress import duo_heads
from kvlab.retrieve import lychee
from kvlab.retrieve.lychee import Lychee, calibration_prompts
from tests.compress.reference import causal_softmax_attention, reference_logits
from tests.conftest import prompt_ids, tiny_engine

LISTED = "lychee(budget=32, block=8, retrieval=0.5, probe_length=128)"
"""A setting where the method must change the result on a 120-token prompt of the tiny model."""
SMALL = dict(block=8, probes=2, probe_length=128, queries=8)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(duo_heads, "_SCORES", {})
    return tmp_path


def lychee_reference(prompt, budget, block, split, log):
    """Decoding rows by LycheeDecode's definition, with loops; ``log`` collects
    ``(layer, row, kv head, retrieval?, blocks)``."""
    chosen = {}  # (row, kv head) -> blocks chosen or inherited in the layer before

    def attention(layer, q, k, v, rope):
        n = q.shape[1]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        out = causal_softmax_attention(qr, kr, v)
        group = q.shape[0] // k.shape[0]
        count = max(1, budget // block)
        for i in range(prompt, n):
            entries = i + 1
            if count * block >= entries:
                continue
            for h in range(k.shape[0]):
                heads = range(h * group, (h + 1) * group)
                if layer == 0 or split[layer][h]:
                    mass = torch.zeros(-(-entries // block))
                    for qh in heads:
                        probs = torch.softmax(qr[qh, i] @ kr[h, :entries].T / q.shape[-1] ** 0.5, -1)
                        for j in range(entries):
                            mass[j // block] += probs[j] / group
                    ordered = mass.sort(descending=True).values
                    assert ordered[count - 1] - ordered[count] > 1e-6, "near tie: pick another prompt"
                    blocks = sorted(mass.topk(count).indices.tolist())
                    log.append((layer, i, h, True, blocks))
                else:
                    blocks = chosen[(i, h)]
                    log.append((layer, i, h, False, blocks))
                    index = [j for j in range(entries) if j // block in blocks]
                    for qh in heads:
                        logits = qr[qh, i] @ kr[h, index].T / q.shape[-1] ** 0.5
                        out[qh, i] = torch.softmax(logits, -1) @ v[h, index]
                chosen[(i, h)] = blocks
        return out

    return attention


@pytest.mark.parametrize("retrieval, layer1", [(0.5, [False, True]), (0.0, [False, False])])
def test_sparse_heads_reuse_the_blocks_of_their_kv_head_in_the_previous_layer(retrieval, layer1):
    """Layer 1 holds one retrieval and one sparse head (0.5), or only sparse heads (0.0)."""
    prompt, steps, budget, block = 97, 9, 32, 8
    ids = prompt_ids(prompt + steps, seed=3)
    engine = tiny_engine()
    recipe = f"lychee(budget={budget}, retrieval={retrieval}, block=8, probes=2, probe_length=128, queries=8)"
    seq = engine.new_sequence(recipe)
    split = seq.prepared["retrieve"]
    assert split[0] == (True, True) and sorted(split[1]) == layer1
    log = []
    expected = reference_logits(ids, lychee_reference(prompt, budget, block, split, log))
    logits = engine.prefill(seq, ids[:prompt], compress=True)
    got = engine.teacher_force(seq, logits, ids[prompt:] + [0])
    torch.testing.assert_close(
        got[1:], torch.log_softmax(expected[prompt:], dim=-1), atol=1e-5, rtol=1e-5
    )
    sparse = [entry for entry in log if not entry[3]]
    assert len(sparse) == steps * layer1.count(False)
    dense = torch.log_softmax(reference_logits(ids)[prompt:], dim=-1)
    assert not torch.allclose(got[1:], dense, atol=1e-3)  # reuse changed the result


def test_calibration_recall_is_the_mass_on_the_previous_layers_blocks():
    """The recall of reuse of a KV head in layer 1: the attention probability its last
    ``queries`` queries put on the top blocks the same KV head chose in layer 0 (written out
    from the reference model), averaged over queries, query heads and prompts."""
    engine = tiny_engine()
    method = Lychee(budget=32, retrieval=0.5, **SMALL)
    settings = method.settings(engine)
    prompts = calibration_prompts(engine, settings)
    assert len(prompts) == 2 and all(len(p) == 128 for p in prompts)
    expected = torch.zeros(2)
    for ids in prompts:
        masses = []

        def attention(layer, q, k, v, rope):
            n = q.shape[1]
            qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
            rows = []
            for i in range(n - settings.queries, n):
                per_head = torch.zeros(2, -(-n // 8))
                for qh in range(4):
                    probs = torch.softmax(qr[qh, i, None] @ kr[qh // 2, : i + 1].T / 4.0, -1)[0]
                    for j in range(i + 1):
                        per_head[qh // 2, j // 8] += probs[j] / 2
                rows.append(per_head)
            masses.append(rows)
            return causal_softmax_attention(qr, kr, v)

        reference_logits(ids, attention)
        for h in range(2):
            for row in range(settings.queries):
                top = masses[0][row][h].topk(4).indices
                expected[h] += masses[1][row][h][top].sum() / settings.queries / 2
    recall = lychee.measure_recall(engine, settings)
    torch.testing.assert_close(recall[1], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(recall[0], torch.ones(2))
    split = method.prepare(engine)
    assert split[1][int(expected.argmin())] and not split[1][int(expected.argmax())]


def test_calibration_is_cached_and_keyed_by_its_settings(cache_dir, monkeypatch):
    engine = tiny_engine()
    first = Lychee(budget=32, retrieval=0.5, **SMALL).prepare(engine)
    assert len(list((cache_dir / "lychee").glob("*.json"))) == 1

    def refuse(engine, settings):
        raise AssertionError("calibration ran again")

    monkeypatch.setattr(lychee, "measure_recall", refuse)
    monkeypatch.setattr(duo_heads, "_SCORES", {})  # a new process: only the file is left
    assert Lychee(budget=32, retrieval=0.5, **SMALL).prepare(engine) == first
    with pytest.raises(AssertionError, match="calibration ran again"):
        Lychee(budget=32, retrieval=0.5, **{**SMALL, "calibration": "random", "probes": 3}).prepare(engine)


def test_every_head_retrieving_or_a_budget_covering_everything_is_full_attention():
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, "full", max_new_tokens=6)
    for recipe in ("lychee(budget=32, block=8, retrieval=1.0)", "lychee(budget=1.0, retrieval=0.5, probe_length=128)"):
        assert engine.generate_ids(ids, recipe, max_new_tokens=6).token_ids == full.token_ids
    sparse = engine.generate_ids(ids, LISTED, max_new_tokens=6)
    assert sparse.token_ids != full.token_ids
    assert sparse.stats.kv_bytes == full.stats.kv_bytes  # no side index: the choice is per forward


def test_a_sparse_head_reads_exactly_its_blocks_the_partial_last_one_included():
    """``Lychee.reuse`` against attention written out over the chosen blocks' entries: the
    partial last block (entries 16..20 of 21) is read from its first entry, not earlier."""
    from kvlab.engine.cache import LayerKV
    from kvlab.engine.context import LayerContext, Phase
    from kvlab.engine.rotary import Rotary
    from kvlab.position.base import TRAINED_ROPE

    g = torch.Generator().manual_seed(5)
    n, d = 21, 8
    layer = LayerKV()
    keys, values = torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, n, d, generator=g)
    layer.append(keys, values, torch.arange(n))
    rotary = Rotary(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    ctx = LayerContext(0, 1, layer, torch.tensor([n - 1]), rotary, TRAINED_ROPE, d**-0.5, Phase.DECODE)
    q = torch.randn(1, 2, 1, d, generator=g)  # the query heads of KV head 1
    for blocks, entries in (([0, 2], [*range(8), *range(16, 21)]), ([1], list(range(8, 16)))):
        got = Lychee(block=8).reuse(q, ctx, 1, torch.tensor([[blocks]]))
        qr = rotary.rotate(q, torch.tensor([n - 1]))
        logits = qr[0, :, 0] @ keys[0, 1, entries].T * d**-0.5
        want = torch.softmax(logits, -1) @ values[0, 1, entries]
        torch.testing.assert_close(got[0, :, 0], want, atol=1e-6, rtol=1e-5)
