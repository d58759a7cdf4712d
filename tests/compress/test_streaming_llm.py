"""StreamingLLM keeps exactly the sinks and the recent window, in every layer."""

import torch

from tests.conftest import prompt_ids, tiny_engine


LISTED = "streaming_llm(budget=30)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


def test_keeps_exactly_sinks_and_recent_tokens():
    engine = tiny_engine()
    cache = engine.new_sequence("streaming_llm(budget=40, sink=4)")
    engine.prefill(cache, prompt_ids(150), compress=True)
    expected = list(range(4)) + list(range(150 - 36, 150))
    for layer in cache.layers:
        assert layer.positions.tolist() == expected
        assert layer.keys.shape[2] == 40 and layer.values.shape[2] == 40


def test_kept_entries_are_the_full_caches_entries():
    engine = tiny_engine()
    ids = prompt_ids(150)
    full, streamed = engine.new_sequence("full"), engine.new_sequence("streaming_llm(budget=40, sink=4)")
    engine.prefill(full, ids, compress=False)
    engine.prefill(streamed, ids, compress=True)
    keep = torch.tensor(list(range(4)) + list(range(114, 150)))
    for a, b in zip(full.layers, streamed.layers):
        torch.testing.assert_close(b.keys, a.keys[:, :, keep])
        torch.testing.assert_close(b.values, a.values[:, :, keep])


def test_fractional_budget_and_no_op_when_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    assert engine.generate_ids(ids, "streaming_llm(budget=0.5)", max_new_tokens=1).stats.kv_tokens == 50
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    roomy = engine.generate_ids(ids, "streaming_llm(budget=100)", max_new_tokens=8)
    assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes
    small = engine.generate_ids(ids, "streaming_llm(budget=20)", max_new_tokens=1)
    whole = engine.generate_ids(ids, "full", max_new_tokens=1)
    # a fifth of the entries, plus one int32 position per kept entry and layer (shared by heads)
    assert small.stats.kv_bytes == whole.stats.kv_bytes * 20 // 100 + 2 * 20 * 4
