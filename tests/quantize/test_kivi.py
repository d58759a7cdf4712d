"""KIVI: keys per channel, values per token, 2/4-bit packed, the newest tokens exact."""

import pytest
import torch

from kvlab.engine.context import Phase

import kvlab
from kvlab.engine.cache import LayerKV
from kvlab.quantize.kivi import Kivi, KiviLayerKV
from tests.conftest import prefilled, prompt_ids, teacher_logprobs, tiny_engine


LISTED = "kivi(group=8, residual=16)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


HEADS, HEAD_DIM = 2, 16  # the tiny models' KV heads and head dim (fp32)


def filled(n=100, bits=2, group=8, residual=16, keys=None, values=None, seed=0):
    """A KIVI layer holding ``n`` random entries, quantised (end of prefill)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, HEADS, n, HEAD_DIM, generator=g) if keys is None else keys
    values = torch.randn(1, HEADS, n, HEAD_DIM, generator=g) if values is None else values
    layer = KiviLayerKV(bits, group, residual)
    layer.append(keys, values, torch.arange(n))
    layer.end_prefill()
    return layer, keys, values


def half_step(x, bits, dim):
    """The error bound of min-max quantisation, scale / 2, broadcast over the group axis."""
    return (x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)) / (2 * (2**bits - 1))


def packed_bytes(keys_q, values_q, keys_fp, values_fp, bits, group, d=HEAD_DIM, heads=HEADS):
    """Bytes of one fp32 layer by hand: codes, a scale and a zero per group, the residual."""
    value_group = min(group, d)
    per_head = (
        keys_q * d * bits // 8 + 2 * (keys_q // group) * d * 4
        + values_q * d * bits // 8 + 2 * values_q * (d // value_group) * 4
        + (keys_fp + values_fp) * d * 4
    )
    return heads * per_head


@pytest.mark.parametrize("bits", [2, 4])
def test_round_trip_error_is_within_half_a_step_and_the_residual_is_exact(bits):
    layer, keys, values = filled(n=100, bits=bits, group=8, residual=16)
    # keys: floor(100 / 16) * 16 = 96 quantised; values: all but the 16 newest
    assert layer.full_precision_entries == (4, 16)
    got_k, got_v = layer.keys, layer.values
    assert got_k.shape == keys.shape and got_v.shape == values.shape
    kq = keys[:, :, :96].reshape(1, HEADS, 12, 8, HEAD_DIM)  # 8 tokens per group, per channel
    err_k = (got_k[:, :, :96].reshape(kq.shape) - kq).abs()
    assert (err_k <= half_step(kq, bits, dim=3) * (1 + 1e-5) + 1e-6).all()
    vq = values[:, :, :84].reshape(1, HEADS, 84, 2, 8)  # 8 channels per group, per token
    err_v = (got_v[:, :, :84].reshape(vq.shape) - vq).abs()
    assert (err_v <= half_step(vq, bits, dim=4) * (1 + 1e-5) + 1e-6).all()
    assert err_k.max() > 0 and err_v.max() > 0  # really quantised
    assert torch.equal(got_k[:, :, 96:], keys[:, :, 96:])
    assert torch.equal(got_v[:, :, 84:], values[:, :, 84:])


def test_keys_are_grouped_per_channel_and_values_per_token():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, HEADS, 64, HEAD_DIM, generator=g)
    keys[..., 0] *= 1000  # an outlier channel, as KIVI observes in keys
    values = torch.randn(1, HEADS, 64, HEAD_DIM, generator=g)
    values[:, :, 5] *= 1000  # an outlier token
    layer, _, _ = filled(n=64, bits=2, group=16, residual=16, keys=keys, values=values)
    err_k = (layer.keys - keys).abs()
    err_v = (layer.values - values).abs()
    # per channel, the outlier channel's scale stays its own: the others keep a small error
    assert err_k[:, :, :48, 1:].max() < 2.0 and err_k[:, :, :48, 0].max() > 20.0
    # per token, the outlier token's scale stays its own: the other tokens keep a small error
    others = torch.cat([err_v[:, :, :5], err_v[:, :, 6:48]], dim=2)
    assert others.max() < 2.0 and err_v[:, :, 5].max() > 20.0


def test_packed_bytes_are_the_real_storage():
    layer, _, _ = filled(n=1000, bits=2, group=32, residual=128)
    assert layer.full_precision_entries == (1000 - 896, 128)
    expected = packed_bytes(896, 872, 104, 128, bits=2, group=32)
    assert layer.nbytes() == expected
    plain = LayerKV()
    zeros = torch.zeros(1, HEADS, 1000, HEAD_DIM)
    plain.append(zeros, zeros, torch.arange(1000))
    assert layer.nbytes() < plain.nbytes() / 3  # head_dim 16: a value scale per 16 numbers


def test_decoding_flushes_whole_key_blocks_and_values_fifo():
    layer, keys, values = filled(n=40, bits=2, group=8, residual=16)
    assert layer.full_precision_entries == (8, 16)
    for n in range(40, 80):
        k, v = torch.randn(1, HEADS, 1, HEAD_DIM), torch.randn(1, HEADS, 1, HEAD_DIM)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        layer.append(k, v, torch.tensor([n]))
        # settled before the append: key residual (n % 16) + the new token; values 16 + 1
        assert layer.full_precision_entries == (n % 16 + 1, 17)
        assert torch.equal(layer.keys[:, :, -1:], k) and torch.equal(layer.values[:, :, -1:], v)
    assert layer.num_entries == 80 and layer.seen == 80
    assert torch.equal(layer.key_positions(), torch.arange(80))
    torch.testing.assert_close(layer.keys, keys, atol=2.0, rtol=0)


@pytest.mark.parametrize("chunks", [[20], [40], [20, 20]])
def test_rollback_to_a_restore_point_is_exact(chunks):
    layer, _, _ = filled(n=40, bits=2, group=8, residual=16)
    context = (layer.keys, layer.values, layer.nbytes())
    g = torch.Generator().manual_seed(5)
    for _ in range(2):  # ask twice: the second time starts from the restored state
        n = 40
        for size in chunks:  # a question's prefill, in chunks; the engine marks after it
            question = torch.randn(1, HEADS, size, HEAD_DIM, generator=g)
            layer.append(question, -question, torch.arange(n, n + size))
            n += size
        marked = (n, layer.keys, layer.values, layer.nbytes())
        for _ in range(2):  # teacher forcing, then the answer: decoding flushes the residual
            for position in range(n, n + 40):
                token = torch.randn(1, HEADS, 1, HEAD_DIM, generator=g)
                layer.append(token, token, torch.tensor([position]))
            assert layer.full_precision_entries[0] < 16
            entries, keys, values, nbytes = marked
            layer.truncate(entries, entries)
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
            assert layer.num_entries == entries == layer.seen and layer.nbytes() == nbytes
        layer.truncate(40, 40)
        assert torch.equal(layer.keys, context[0]) and torch.equal(layer.values, context[1])
        assert layer.num_entries == 40 == layer.seen and layer.nbytes() == context[2]


def test_rollback_to_the_state_right_after_a_selection_is_exact():
    """A retrieve method's index may select entries right after the conversion (ShadowKV,
    A2ATS move the context's chunks out at the end of the context), and a session marks
    there: a request's decoding then flushes values FIFO, and rolling back must bring them
    back in full precision (it once left them quantised: every later request saw another
    context)."""
    layer, _, _ = filled(n=70, bits=2, group=8, residual=16)
    layer.select(torch.arange(0, 70, 2))  # 35 entries: 32 keys quantised, 3 exact
    context = (layer.keys, layer.values, layer.nbytes())
    g = torch.Generator().manual_seed(6)
    for position in range(70, 90):  # a request's question and answer
        token = torch.randn(1, HEADS, 1, HEAD_DIM, generator=g)
        layer.append(token, token, torch.tensor([position]))
    assert layer.full_precision_entries[1] < 16 + 3  # values were flushed
    layer.truncate(35, 70)
    assert torch.equal(layer.keys, context[0]) and torch.equal(layer.values, context[1])
    assert layer.num_entries == 35 and layer.nbytes() == context[2]


def test_eviction_after_the_prefill_keeps_codes_exactly():
    layer, _, _ = filled(n=70, bits=2, group=8, residual=16)  # keys: 64 quantised, 6 exact
    keys, values = layer.keys, layer.values
    keep = torch.tensor([[list(range(0, 60, 2)) + [62, 63, 64, 65, 66, 67, 68],  # 32 quantised
                          list(range(1, 61, 2)) + [61, 64, 65, 66, 67, 68, 69]]])  # 31 quantised
    layer.select(keep)
    index = keep[..., None].expand(-1, -1, -1, HEAD_DIM)
    torch.testing.assert_close(layer.keys, keys.gather(2, index), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.values, values.gather(2, index), rtol=0, atol=1e-6)
    assert torch.equal(layer.positions, keep.to(torch.int32))
    assert layer.full_precision_entries[0] == 37 - 31  # the first head's 32nd key moved over
    ones = torch.ones(1, HEADS, 1, HEAD_DIM)
    layer.append(ones, ones, torch.tensor([70]))
    assert layer.num_entries == 38 and layer.positions[0, :, -1].tolist() == [70, 70]


def test_methods_list_kivi_under_quantize_with_its_paper():
    info = next(m for m in kvlab.methods() if m.name == "kivi")
    assert info.stage == "quantize" and "2402.02750" in info.paper
    assert {p.name: p.default for p in info.params} == {"bits": 2, "group": 32, "residual": 128}
    recipe = kvlab.parse_recipe("snapkv(budget=0.5) + kivi(bits=4)")
    assert recipe.quantize == Kivi(bits=4)


@pytest.mark.parametrize(
    "recipe, match",
    [
        ("kivi(bits=3)", r"kivi\(bits=3\): must be one of 2, 4"),
        ("kivi(residual=100, group=32)", r"residual=100, group=32\).*multiple of group.*96 or 128"),
        ("kivi(group=0)", r"kivi\(group=0\): must be >= 1"),
    ],
)
def test_bad_parameters_are_refused_clearly(recipe, match):
    with pytest.raises(kvlab.RecipeError, match=match):
        kvlab.parse_recipe(recipe)


# -- in the engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    return tiny_engine(max_position_embeddings=2048)


def test_4bit_follows_full_precision_closely_and_2bit_less(engine):
    ids, follow = prompt_ids(400), prompt_ids(32, seed=2)
    full_logits, full = teacher_logprobs(engine, "full", ids, follow)
    divergence, agreement = {}, {}
    for bits in (2, 4):
        logits, quant = teacher_logprobs(engine, f"kivi(bits={bits})", ids, follow)
        # the prefill attends in full precision (as in the paper); it quantises at its end
        torch.testing.assert_close(logits, full_logits)
        divergence[bits] = float((full.exp() * (full - quant)).sum(-1).mean())
        agreement[bits] = float((full.argmax(-1) == quant.argmax(-1)).float().mean())
    assert agreement[4] >= 0.95 and divergence[4] < 1e-3
    assert divergence[2] > 4 * divergence[4] > 0


def test_kv_bytes_are_the_packed_size(engine):
    full = engine.generate_ids(prompt_ids(1000), "full", max_new_tokens=1)
    kivi = engine.generate_ids(prompt_ids(1000), "kivi", max_new_tokens=1)
    assert kivi.stats.kv_tokens == full.stats.kv_tokens == 1000
    assert kivi.stats.kv_bytes == 2 * packed_bytes(896, 872, 104, 128, bits=2, group=32)
    assert kivi.stats.kv_bytes < full.stats.kv_bytes / 3


def test_residual_stays_bounded_over_a_long_generation(engine):
    cache = engine.new_sequence("kivi(bits=2)")
    logits = engine.prefill(cache, prompt_ids(200), compress=True)
    for entries in range(201, 501):
        logits = engine.forward(cache, [int(logits.argmax())], Phase.DECODE)
        for layer in cache.layers:
            fp_keys, fp_values = layer.full_precision_entries
            assert fp_keys == (entries - 1) % 128 + 1 <= 128  # whole blocks of 128 flushed
            assert fp_values == 129  # FIFO: 128 + the newest
        quantised_keys, quantised_values = (entries - 1) // 128 * 128, entries - 129
        # the context's residual (keys 128..199, values 72..199) is copied as it is flushed,
        # to restore the end of the prefill exactly (a session's mark)
        kept_keys = max(0, min(quantised_keys, 200) - 128)
        kept_values = min(quantised_values, 200) - 72
        expected = packed_bytes(
            quantised_keys, quantised_values, entries - quantised_keys + kept_keys,
            129 + kept_values, bits=2, group=32,
        )
        assert cache.nbytes() == 2 * expected


def test_eviction_then_quantisation_stores_half_the_entries_packed(engine):
    ids = prompt_ids(1000)
    full = engine.generate_ids(ids, "full", max_new_tokens=1)
    both = engine.generate_ids(ids, "snapkv(budget=0.5) + kivi(bits=2)", max_new_tokens=1)
    assert both.stats.kv_tokens == 500
    positions = HEADS * 500 * 4  # int32 per KV head after per-head selection
    assert both.stats.kv_bytes == 2 * (packed_bytes(384, 372, 116, 128, 2, 32) + positions)
    assert both.stats.kv_bytes < full.stats.kv_bytes / 5


def test_a_cache_shorter_than_the_residual_stays_in_full_precision(engine):
    """Nothing to quantise yet (60 entries < residual 128): reading the empty packed part
    works, and the answer equals the same eviction without KIVI."""
    ids = prompt_ids(160)
    plain = engine.generate_ids(ids, "snapkv(budget=60)", max_new_tokens=6)
    both = engine.generate_ids(ids, "snapkv(budget=60) + kivi(bits=2)", max_new_tokens=6)
    assert both.token_ids == plain.token_ids


def test_eviction_while_decoding_selects_among_quantised_entries(engine):
    ids = prompt_ids(160)
    alone = engine.generate_ids(ids, "h2o(budget=0.5)", max_new_tokens=12)
    recipe = "h2o(budget=0.5) + kivi(group=8, residual=16)"
    both = engine.generate_ids(ids, recipe, max_new_tokens=12)
    assert len(both.token_ids) == 12 and both.stats.kv_tokens == alone.stats.kv_tokens
    assert both.stats.kv_bytes < alone.stats.kv_bytes / 2


CONTEXT = "Alice keeps the red door code. The code of the red door is 4417. " * 20


def test_multi_request_session_rolls_back_exactly(tokenizer):
    engine = tiny_engine(
        tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048
    )
    session = engine.session(CONTEXT, recipe="kivi(bits=2, group=8, residual=16)")
    context_bytes = session.sequence.nbytes()
    question = "What is the code of the red door?"
    first = session.ask(question, max_new_tokens=24)
    assert session.sequence.nbytes() == context_bytes
    teacher = session.ask(question, max_new_tokens=24, teacher_tokens=first.token_ids)
    again = session.ask(question, max_new_tokens=24)
    for other in (teacher, again):  # teacher forcing rolled back to the question's mark exactly
        assert other.token_ids == first.token_ids and other.stats.kv_bytes == first.stats.kv_bytes
    assert teacher.teacher_logprobs.argmax(-1).tolist() == first.token_ids  # greedy, same cache


def test_engine_quantises_keys_per_channel_groups_and_values_per_token_the_residual_exact():
    """Against the eager model's keys and values: after a 108-token prefill with residual 16
    and group 8, the first 96 keys (whole residual blocks, not the 104 of whole groups) read
    back within half a step of their group's per-channel range (8 tokens x 1 channel) and the
    12 newest exactly; the first 92 values within half a step of their per-token range (8
    channels), the 16 newest exactly."""
    from tests.compress.reference import eager_run
    from tests.conftest import prompt_ids, tiny_engine

    n, bits, group, residual = 108, 2, 8, 16
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids)
    engine = tiny_engine()
    cache = prefilled(engine, f"kivi(bits={bits}, group={group}, residual={residual})", ids)
    levels = 2**bits - 1
    for index, layer in enumerate(cache.layers):
        keys, values = run.keys[index], run.values[index]  # [Hkv, n, d]
        got_keys, got_values = layer.keys[0], layer.values[0]
        quantised_keys, quantised_values = n // residual * residual, n - residual
        torch.testing.assert_close(got_keys[:, quantised_keys:], keys[:, quantised_keys:])
        torch.testing.assert_close(got_values[:, quantised_values:], values[:, quantised_values:])
        assert not torch.allclose(got_keys[:, quantised_keys - 1], keys[:, quantised_keys - 1])
        assert not torch.allclose(got_values[:, quantised_values - 1], values[:, quantised_values - 1])
        k = keys[:, :quantised_keys].reshape(2, -1, group, keys.shape[-1])  # token groups
        k_step = (k.amax(2, keepdim=True) - k.amin(2, keepdim=True)) / levels
        k_err = (got_keys[:, :quantised_keys].reshape(k.shape) - k).abs()
        assert (k_err <= k_step / 2 + 1e-5).all()
        v = values[:, :quantised_values].reshape(2, quantised_values, -1, group)  # channel groups
        v_step = (v.amax(3, keepdim=True) - v.amin(3, keepdim=True)) / levels
        v_err = (got_values[:, :quantised_values].reshape(v.shape) - v).abs()
        assert (v_err <= v_step / 2 + 1e-5).all()
