"""Ragged layers: KV heads holding different entries, stored physically per head."""

import torch

from kvlab.engine.kernels import dense_attention
from kvlab.engine.ragged import RaggedLayerKV, ragged_attention
from kvlab.position.base import TRAINED_ROPE
from tests.layers import rotary

D, N = 8, 40


def ragged_layer(keep):
    torch.manual_seed(0)
    layer = RaggedLayerKV()
    layer.append(torch.randn(1, 2, N, D), torch.randn(1, 2, N, D), torch.arange(N))
    full_keys, full_values = layer.keys.clone(), layer.values.clone()
    layer.select_per_head([torch.tensor(k) for k in keep])
    return layer, full_keys, full_values


KEEP = [[0, 1, 2, 30, 39], list(range(0, 40, 2))]


def test_heads_store_only_their_entries():
    layer, full_keys, _ = ragged_layer(KEEP)
    assert layer.is_ragged and layer.head_entries() == [5, 20]
    assert layer.keys is None
    for h, keep in enumerate(KEEP):
        head = layer.heads[h]
        assert head.keys.shape == (1, 1, len(keep), D)
        assert torch.equal(head.keys[0, 0], full_keys[0, h, keep])
        assert head.key_positions().tolist() == keep
    entries = sum(len(k) for k in KEEP)
    assert layer.nbytes() == entries * D * 4 * 2 + entries * 4  # keys + values fp32, int32 positions


def attention_reference(q, full_keys, full_values, keep, q_pos):
    """Masked attention over the rectangular layer: each head sees only its kept entries."""
    allowed = torch.zeros(1, 2, q.shape[2], N, dtype=torch.bool)
    for h, k in enumerate(keep):
        allowed[0, h, :, k] = True
    allowed &= torch.arange(N)[None, :] <= q_pos[:, None]
    rot = rotary(D)
    return dense_attention(rot.rotate(q, q_pos), full_keys, full_values, D**-0.5, allowed)


def test_attention_is_exact_for_what_each_head_keeps():
    layer, full_keys, full_values = ragged_layer(KEEP)
    q = torch.randn(1, 4, 1, D)  # GQA: two query heads per KV head
    q_pos = torch.tensor([N])
    rot = rotary(D)

    def attend(q_, q_pos_, k, k_pos, v):
        return TRAINED_ROPE.attend(q_, q_pos_, k, k_pos, v, rot, D**-0.5)

    out = ragged_attention(q, q_pos, layer, attend)
    assert torch.allclose(out, attention_reference(q, full_keys, full_values, KEEP, q_pos), atol=1e-6)
    dense = attend(q, q_pos, full_keys, torch.arange(N), full_values)
    assert not torch.allclose(out, dense, atol=1e-3)


def test_appends_reach_every_head_and_rollback_is_exact():
    layer, _, _ = ragged_layer(KEEP)
    mark = layer.mark(snapshot=True)
    before = [(h.keys.clone(), h.key_positions().clone()) for h in layer.heads]
    layer.append(torch.ones(1, 2, 3, D), torch.ones(1, 2, 3, D), torch.arange(N, N + 3))
    assert layer.head_entries() == [8, 23] and layer.seen == N + 3
    assert layer.heads[1].key_positions()[-3:].tolist() == [N, N + 1, N + 2]
    layer.restore(mark)  # no eviction since the mark: appended entries are dropped
    assert layer.head_entries() == [5, 20]
    layer.append(torch.ones(1, 2, 1, D), torch.ones(1, 2, 1, D), torch.tensor([N]))
    layer.select_per_head([torch.tensor([0, 5]), torch.tensor([20])])  # evict while decoding
    layer.restore(mark)
    for head, (keys, positions) in zip(layer.heads, before):
        assert torch.equal(head.keys, keys) and torch.equal(head.key_positions(), positions)
    assert layer.seen == N
