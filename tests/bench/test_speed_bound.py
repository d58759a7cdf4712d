"""The physical-limit bounds of benchmarks/speed.py: the work they count is the work done."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
_spec = importlib.util.spec_from_file_location("kvlab_speed_benchmark", _PATH)
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)

CONFIG = SimpleNamespace(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=100)


def _ashape_mask(n: int, sink: int, window: int) -> torch.Tensor:
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & ((j < sink) | (i - j < window))


def test_ashape_pairs_count_the_band_mask() -> None:
    for n, sink, window in [(10, 2, 4), (4, 2, 4), (33, 4, 8), (64, 0, 16)]:
        recipe = f"ashape(sink={sink}, window={window})"
        assert speed.attended_pairs(recipe, n, n) == _ashape_mask(n, sink, window).sum().item()


def test_dense_pairs_are_causal_per_pass() -> None:
    assert speed.attended_pairs("full", 10, 10) == 55
    assert speed.attended_pairs("full", 4, 10) == 10  # a later FastKV layer: the kept tokens
    assert speed.attended_pairs("full", 14, 10) == 55 + 10  # GemFilter: context, then kept


def test_bound_follows_the_tokens_each_layer_ran() -> None:
    full = speed.prefill_flops(CONFIG, [100, 100, 100], 100, "full")
    fewer = speed.prefill_flops(CONFIG, [100, 100, 20], 100, "fastkv")
    more = speed.prefill_flops(CONFIG, [120, 120, 20], 100, "gemfilter")
    assert fewer < full
    per_layer = 2 * (64 * 4 * 16 * 2 + 64 * 2 * 16 * 2 + 3 * 64 * 128)
    attention = 4 * 16 * 4
    assert full - fewer == per_layer * 80 + attention * (100 * 101 / 2 - 20 * 21 / 2)
    assert more - fewer == 2 * (per_layer * 20 + attention * 20 * 21 / 2)
    # plain transformers reports no per-layer counts: every layer ran the prompt
    assert speed.prefill_flops(CONFIG, [], 100, "transformers") == full
