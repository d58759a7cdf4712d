"""The real embedded model (SmolLM2-135M-Instruct): answers, reuse, honest stats."""

import pytest

pytestmark = pytest.mark.integration

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_CONTEXT = (
    "There is a pass key hidden in this text. Find it and remember it.\n"
    + FILLER * 12
    + "The pass key is 71432. Remember it. 71432 is the pass key. "
    + FILLER * 12
)


@pytest.mark.parametrize("recipe", ["full", "quest(budget=256)", "yarn(factor=2)"])
def test_ask_answers_a_passkey_question(default_engine, recipe):
    session = default_engine.session(PASSKEY_CONTEXT, recipe=recipe)
    answer = session.ask("What is the pass key?", answer_prefix="The pass key is", max_new_tokens=8)
    assert "71432" in answer.text


def test_generate_answers_a_passkey_question(default_engine):
    answer = default_engine.generate(PASSKEY_CONTEXT + "\n\nWhat is the pass key?", max_new_tokens=12)
    assert "71432" in answer.text
    assert answer.stats.prompt_tokens > 500


def test_multi_turn_session_reuses_its_cache(default_engine):
    before = default_engine.counters.prefilled_tokens
    session = default_engine.session(PASSKEY_CONTEXT, mode="multi-turn")
    first = session.ask("What is the pass key?", answer_prefix="The pass key is", max_new_tokens=8)
    second = session.ask("Say the pass key again.", max_new_tokens=8)
    context_tokens = session.context_stats.prompt_tokens
    prefilled = default_engine.counters.prefilled_tokens - before
    assert prefilled == context_tokens + first.stats.prefilled_tokens + second.stats.prefilled_tokens
    assert prefilled < 1.2 * context_tokens  # the context was encoded once
    assert second.stats.prompt_tokens > context_tokens + len(first.token_ids)
    assert "71432" in first.text


def test_compression_really_shrinks_the_cache(default_engine):
    full = default_engine.session(PASSKEY_CONTEXT)
    snap = default_engine.session(PASSKEY_CONTEXT, recipe="snapkv(budget=0.25)")
    ratio = snap.context_stats.kv_bytes / full.context_stats.kv_bytes
    assert 0.2 < ratio < 0.3


def test_load_accepts_a_gguf_path_and_refuses_missing_models():
    import kvlab
    from kvlab.engine.loading import default_gguf

    engine = kvlab.load(str(default_gguf()), device="cpu", dtype="float32", progress=False)
    assert engine.name == "SmolLM2-135M-Instruct.Q4_1" and engine.config.num_hidden_layers == 30
    with pytest.raises(kvlab.ModelError, match="never downloads"):
        kvlab.load("HuggingFaceTB/SmolLM2-135M-Instruct")
