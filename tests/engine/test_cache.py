"""KV storage: physical selection, positions, byte accounting, rollback."""

import torch

from kvlab.engine.cache import LayerKV
from kvlab.engine.sequence import KVCache


def filled_layer(n=10, heads=2, d=4):
    layer = LayerKV()
    keys = torch.arange(n * heads * d, dtype=torch.float32).reshape(1, heads, n, d)
    layer.append(keys, -keys, torch.arange(n))
    return layer


def test_contiguous_layer_stores_no_positions():
    layer = filled_layer()
    assert layer.is_contiguous and layer.positions is None
    assert torch.equal(layer.key_positions(), torch.arange(10))
    assert layer.nbytes() == 2 * 1 * 2 * 10 * 4 * 4
    assert layer.seen == 10


def test_shared_selection_shrinks_tensors_and_keeps_positions():
    layer = filled_layer()
    before = layer.keys.clone()
    layer.select(torch.tensor([0, 1, 7, 8, 9]))
    assert layer.keys.shape == (1, 2, 5, 4)
    assert torch.equal(layer.keys, before[:, :, [0, 1, 7, 8, 9]])
    assert torch.equal(layer.positions, torch.tensor([0, 1, 7, 8, 9], dtype=torch.int32))
    assert layer.nbytes() == 2 * 2 * 5 * 4 * 4 + 5 * 4


def test_per_head_selection_and_append():
    layer = filled_layer()
    before = layer.keys.clone()
    keep = torch.tensor([[[0, 3, 9], [1, 2, 9]]])
    layer.select(keep)
    assert torch.equal(layer.keys[0, 0], before[0, 0, [0, 3, 9]])
    assert torch.equal(layer.keys[0, 1], before[0, 1, [1, 2, 9]])
    assert layer.positions.shape == (1, 2, 3)
    layer.append(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), torch.tensor([10]))
    assert layer.positions[0, :, -1].tolist() == [10, 10]
    assert layer.seen == 11 and layer.num_entries == 4


def test_rollback_discards_appended_entries():
    cache = KVCache(2)
    for layer in cache.layers:
        layer.append(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4), torch.arange(6))
    mark = cache.mark()
    bytes_before = cache.nbytes()
    for layer in cache.layers:
        layer.append(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), torch.arange(6, 9))
    assert cache.get_seq_length() == 9
    cache.rollback(mark)
    assert cache.get_seq_length() == 6 and cache.nbytes() == bytes_before
    assert cache.mean_entries() == 6


def test_decoding_appends_in_place_with_a_small_counted_reserve():
    layer = filled_layer(n=64)
    layer.append(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), torch.tensor([64]))
    storage = layer.keys.data_ptr()
    assert layer.capacity == 65 + 4  # reserve of n // 16 entries
    assert layer.nbytes() == 2 * 2 * 69 * 4 * 4  # reserved entries are allocated memory
    for position in range(65, 69):
        layer.append(torch.full((1, 2, 1, 4), float(position)), torch.ones(1, 2, 1, 4), torch.tensor([position]))
    assert layer.keys.data_ptr() == storage and layer.capacity == 69  # no copy while the reserve lasts
    assert layer.keys.shape[2] == 69 and float(layer.keys[0, 0, -1, 0]) == 68.0
