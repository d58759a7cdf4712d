"""The physical-limit bounds of benchmarks/speed.py: the work they count is the work done."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace


_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
_spec = importlib.util.spec_from_file_location("kvlab_speed_benchmark", _PATH)
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)

CONFIG = SimpleNamespace(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=100)


def test_bound_follows_the_work_each_layer_did() -> None:
    """Linear work from the tokens each layer ran, attention work from the pairs it computed
    (``Stats.prefilled_per_layer`` / ``attended_pairs_per_layer``, counted by the engine)."""
    dense = 4 * 100 * 101 // 2
    full = speed.prefill_flops(CONFIG, [100, 100, 100], 100, [dense] * 3)
    fewer = speed.prefill_flops(CONFIG, [100, 100, 20], 100, [dense, dense, 4 * 210])
    sparse = speed.prefill_flops(CONFIG, [100, 100, 100], 100, [dense, dense, 1000])
    assert fewer < full and sparse < full
    per_layer = 2 * (64 * 4 * 16 * 2 + 64 * 2 * 16 * 2 + 3 * 64 * 128)
    assert full - fewer == per_layer * 80 + 4 * 16 * (dense - 4 * 210)
    assert full - sparse == 4 * 16 * (dense - 1000)
    # plain transformers reports no per-layer counts: every layer ran the prompt densely
    assert speed.prefill_flops(CONFIG, [], 100) == full
    assert speed.attended_share(CONFIG, {"layer_pairs": [dense, dense, dense // 2]}, 100) == 5 / 6
