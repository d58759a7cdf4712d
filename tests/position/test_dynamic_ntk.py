"""Dynamic NTK: the published base formula and consistency with transformers' dynamic rope."""

import copy

import pytest
import torch

from kvlab.engine.context import Phase

from kvlab.position.dynamic_ntk import DynamicNTK
from tests.conftest import prompt_ids, tiny_engine, tiny_model


LISTED = "dynamic_ntk(factor=4)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


@pytest.mark.parametrize("length", [100, 256, 400, 1000])
def test_base_grows_with_length_past_the_trained_length(length):
    engine = tiny_engine(rope_theta=10000.0)  # trained length 256, head dim 16
    factor, trained, d = 4.0, 256, 16
    scale = max(length, trained)
    base = 10000.0 * ((factor * scale / trained) - (factor - 1)) ** (d / (d - 2))
    expected = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    rotary = DynamicNTK(factor=factor).rotary(engine.config, seq_len=length)
    torch.testing.assert_close(rotary.inv_freq, expected, rtol=1e-5, atol=1e-9)
    if length <= trained:
        torch.testing.assert_close(rotary.inv_freq, 1.0 / 10000.0 ** (torch.arange(0, d, 2).float() / d))


def test_prefill_past_the_window_equals_transformers_dynamic_rope():
    ids = prompt_ids(400)  # longer than the trained 256 tokens
    reference = tiny_model()
    config = copy.deepcopy(reference.config)
    config.rope_parameters = {**config.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    reference.model.rotary_emb = type(reference.model.rotary_emb)(config)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1]
    engine = tiny_engine()
    engine.prefill_chunk = 1000
    got = engine.prefill(engine.new_sequence("dynamic_ntk(factor=2)"), ids, compress=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_rerotated_cache_stays_consistent_with_a_fresh_prefill():
    """With rerotate_cache, decoding past the window equals prefilling the whole sequence;
    rotating keys once (as transformers' cache does) does not."""
    ids = prompt_ids(300)
    engine = tiny_engine()
    engine.prefill_chunk = 1000
    fresh = engine.prefill(engine.new_sequence("dynamic_ntk(factor=2)"), ids, compress=False)
    for rerotate, consistent in ((True, True), (False, False)):
        cache = engine.new_sequence(f"dynamic_ntk(factor=2, rerotate_cache={rerotate})")
        engine.prefill(cache, ids[:-40], compress=False)
        for token in ids[-40:]:
            logits = engine.forward(cache, [token], Phase.DECODE)
        assert torch.allclose(logits, fresh, atol=1e-4) is consistent
