"""The engine against plain transformers, and its checks."""

import pytest
import torch

import kvlab
from kvlab.engine.sampling import Sampling
from tests.conftest import ARCHITECTURES, prompt_ids, tiny_engine, tiny_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_full_equals_transformers_generate(arch):
    reference_model = tiny_model(arch)
    ids = prompt_ids(60)
    expected = reference_model.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12
    )[0, len(ids):].tolist()
    engine = tiny_engine(arch)
    assert engine.generate_ids(ids, "full", max_new_tokens=12).token_ids == expected


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_prefill_logits_equal_transformers(arch):
    reference = tiny_model(arch)
    ids = prompt_ids(50)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1]
    engine = tiny_engine(arch)
    logits = engine.prefill(engine.new_sequence("full"), ids, compress=False)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_one_shot():
    ids = prompt_ids(100)
    one = tiny_engine()
    one.prefill_chunk = 1000
    chunked = tiny_engine()
    chunked.prefill_chunk = 16
    a = one.prefill(one.new_sequence("full"), ids, compress=False)
    b = chunked.prefill(chunked.new_sequence("full"), ids, compress=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_chunks_merge_a_short_tail():
    engine = tiny_engine()
    engine.prefill_chunk = 100
    assert engine.chunks(230) == [(0, 100), (100, 230)]
    assert engine.chunks(260) == [(0, 100), (100, 200), (200, 260)]
    assert engine.chunks(50) == [(0, 50)]


def test_multimodal_gemma3_is_refused_with_the_text_model_named():
    """Gemma-3 text models run (tests/engine/test_gemma3.py); the multimodal wrapper does not."""
    from types import SimpleNamespace

    from kvlab.engine.engine import check_architecture

    with pytest.raises(kvlab.ModelError, match="'gemma3' is not supported.*Gemma3ForCausalLM"):
        check_architecture(SimpleNamespace(model_type="gemma3"))


def test_overflow_is_refused_with_a_suggestion_unless_allowed():
    engine = tiny_engine()  # trained window: 256 tokens
    ids = prompt_ids(300)
    with pytest.raises(kvlab.InputError, match=r"exceed the 256-token window.*yarn\(factor=2\)"):
        engine.generate_ids(ids, "full", max_new_tokens=4)
    assert len(engine.generate_ids(ids, "full", max_new_tokens=4, allow_overflow=True).token_ids) == 4
    assert len(engine.generate_ids(ids, "yarn(factor=2)", max_new_tokens=4).token_ids) == 4


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_new_tokens_is_validated(bad):
    with pytest.raises(kvlab.InputError, match="max_new_tokens"):
        tiny_engine().generate_ids(prompt_ids(10), "full", max_new_tokens=bad)


def test_sampling_is_seeded_and_validated():
    engine = tiny_engine()
    ids = prompt_ids(20)
    a = engine.generate_ids(ids, max_new_tokens=8, sampling=Sampling(temperature=1.5, seed=3))
    b = engine.generate_ids(ids, max_new_tokens=8, sampling=Sampling(temperature=1.5, seed=3))
    greedy = engine.generate_ids(ids, max_new_tokens=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids
    with pytest.raises(kvlab.InputError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(kvlab.InputError, match="top_p"):
        Sampling(top_p=0)


def test_stops_at_the_end_of_sequence_token():
    engine = tiny_engine()
    ids = prompt_ids(20)
    first = engine.generate_ids(ids, max_new_tokens=1).token_ids[0]
    engine.stop_ids = {first}
    assert engine.generate_ids(ids, max_new_tokens=10).token_ids == [first]


def test_kv_bytes_is_the_physical_size_and_falls_with_the_budget():
    engine = tiny_engine()
    ids = prompt_ids(200)
    config = engine.config
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    full = engine.generate_ids(ids, "full", max_new_tokens=1).stats
    # 200 prompt tokens are cached (the single generated token is not run through the model)
    assert full.kv_bytes == config.num_hidden_layers * 2 * kv_heads * 200 * head_dim * 4
    sizes = []
    for budget in (150, 100, 50):
        stats = engine.generate_ids(ids, f"snapkv(budget={budget})", max_new_tokens=1).stats
        assert stats.kv_tokens == budget
        entries = config.num_hidden_layers * kv_heads * budget
        # keys + values in float32, plus one int32 position per kept entry
        assert stats.kv_bytes == entries * (2 * head_dim * 4 + 4)
        sizes.append(stats.kv_bytes)
    assert full.kv_bytes > sizes[0] > sizes[1] > sizes[2]


def test_stats_are_measured():
    stats = tiny_engine().generate_ids(prompt_ids(40), max_new_tokens=5).stats
    assert stats.prompt_tokens == 40 and stats.prefilled_tokens == 40 and stats.new_tokens == 5
    assert stats.prefill_s > 0 and stats.decode_s > 0
    assert stats.as_dict()["decode_s_per_token"] == pytest.approx(stats.decode_s / 5)


@pytest.mark.parametrize("recipe", ["full", "snapkv(budget=0.5) + kivi(bits=4)", "quest(budget=32, page=8)"])
def test_a_normal_run_warns_nothing(recipe, tokenizer):
    """No deprecation (transformers' past_key_values) or other warning on a normal run."""
    import warnings

    engine = kvlab.Engine(tiny_model(vocab_size=len(tokenizer)), tokenizer, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.generate("The code is 4417. " * 8 + "What is the code?", recipe=recipe, max_new_tokens=3)
        session = engine.session("The code is 4417. " * 8, recipe=recipe, mode="multi-turn")
        session.ask("What is the code?", max_new_tokens=3)


def test_per_forward_state_is_not_left_on_the_cache_or_the_engine():
    """The cache holds storage only; a forward's state travels in one ForwardContext."""
    from kvlab.engine.forward import ForwardContext

    engine = tiny_engine()
    sequence = engine.new_sequence("snapkv(budget=0.5)")
    before = (set(vars(sequence.cache)), set(vars(engine)))
    engine.prefill(sequence, prompt_ids(40), compress=True)
    assert (set(vars(sequence.cache)), set(vars(engine))) == before
    assert not any(isinstance(v, ForwardContext) for v in (*vars(sequence).values(), *vars(engine).values()))


def test_set_up_probes_are_not_counted_and_leave_the_engine_as_it_was():
    engine = tiny_engine()
    engine.progress = True
    counters = vars(engine.counters).copy()
    engine.probe(kvlab.parse_recipe("full"), prompt_ids(20))
    assert vars(engine.counters) == counters and engine.progress is True
