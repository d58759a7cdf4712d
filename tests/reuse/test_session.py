"""Sessions: the context is encoded once; multi-request forgets, multi-turn remembers."""

import pytest
import torch

import kvlab
from tests.conftest import tiny_engine

CONTEXT = "Alice keeps the red door code. The code of the red door is 4417. " * 20


@pytest.fixture()
def engine(tokenizer):
    return tiny_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048)


def test_first_answer_equals_a_single_prompt(engine):
    question = "What is the code of the red door?"
    single = engine.generate(CONTEXT + "\n\n" + question, max_new_tokens=8)
    session = engine.session(CONTEXT)
    assert session.ask(question, max_new_tokens=8).token_ids == single.token_ids


def test_multi_request_discards_each_question(engine):
    session = engine.session(CONTEXT, recipe="snapkv(budget=0.5)", mode="multi-request")
    context_entries = session.sequence.mean_entries()
    first = session.ask("What is the code?", max_new_tokens=6)
    assert session.sequence.mean_entries() == context_entries
    assert first.stats.kv_tokens > context_entries  # the question was there while answering
    again = session.ask("What is the code?", max_new_tokens=6)
    assert again.token_ids == first.token_ids
    assert engine.counters.prefilled_tokens == session.context_stats.prompt_tokens + 2 * first.stats.prefilled_tokens


def test_multi_turn_keeps_questions_and_answers_and_prefills_the_context_once(engine):
    session = engine.session(CONTEXT, mode="multi-turn")
    context_tokens = session.context_stats.prompt_tokens
    first = session.ask("What is the code?", max_new_tokens=5)
    second = session.ask("And who keeps it?", max_new_tokens=5)
    assert second.stats.prompt_tokens > first.stats.prompt_tokens + len(first.token_ids) - 1
    assert engine.counters.prefilled_tokens == (
        context_tokens + first.stats.prefilled_tokens + second.stats.prefilled_tokens
    )
    assert second.stats.prefilled_tokens < context_tokens / 4  # only the new turn is encoded


def test_compressed_session_holds_fewer_bytes(engine):
    full = engine.session(CONTEXT)
    snap = engine.session(CONTEXT, recipe="snapkv(budget=0.25)")
    assert snap.context_stats.kv_bytes < full.context_stats.kv_bytes / 2
    assert snap.context_stats.kv_tokens == pytest.approx(full.context_stats.kv_tokens * 0.25, abs=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"mode": "chat"}, "multi-request, multi-turn"), ({"context": "  "}, "context is empty")],
)
def test_bad_session_arguments(engine, kwargs, match):
    args = {"context": CONTEXT, **kwargs}
    with pytest.raises(kvlab.InputError, match=match):
        engine.session(**args)


def test_long_context_is_refused_without_a_position_method(engine):
    long_context = "word " * 3000
    with pytest.raises(kvlab.InputError, match="yarn"):
        engine.session(long_context)
    session = engine.session(long_context, recipe="yarn(factor=2)")
    assert session.ask("Which word?", max_new_tokens=2).stats.prompt_tokens > 2048


def test_teacher_forcing_scores_the_given_answer(engine):
    session = engine.session(CONTEXT, mode="multi-request")
    reference = session.ask("What is the code?", max_new_tokens=6, keep_logprobs=True)
    assert reference.logprobs.shape == (6, len(engine.tokenizer))
    forced = session.ask("What is the code?", max_new_tokens=6, teacher_tokens=reference.token_ids)
    # fed its own greedy answer, the same cache gives the same distributions
    import torch

    torch.testing.assert_close(forced.teacher_logprobs, reference.logprobs, atol=1e-4, rtol=1e-4)
    assert forced.token_ids == reference.token_ids  # teacher forcing leaves decoding untouched


def test_multi_turn_with_reference_answers_keeps_the_gold_history(engine):
    gold = engine.session(CONTEXT, mode="multi-turn")
    gold.ask("What is the code?", max_new_tokens=4, reference_answer="4417.")
    second = gold.ask("Who keeps it?", max_new_tokens=4)
    assert "4417." in gold.transcript and second.stats.prompt_tokens < gold.context_stats.prompt_tokens + 40


def _layer_state(cache):
    return [(layer.keys.clone(), layer.values.clone(), layer.key_positions().clone()) for layer in cache.layers]


@pytest.mark.parametrize(
    "recipe", ["h2o(budget=0.4)", "tova(budget=0.4)", "snapkv(budget=0.5, decode_budget=40, decode_interval=2)"]
)
def test_multi_request_restores_entries_evicted_while_decoding(engine, recipe):
    session = engine.session(CONTEXT, recipe=recipe, mode="multi-request")
    before = _layer_state(session.sequence)
    first = session.ask("What is the code of the red door?", max_new_tokens=12)
    after = _layer_state(session.sequence)
    for (k0, v0, p0), (k1, v1, p1) in zip(before, after):
        assert torch.equal(k0, k1) and torch.equal(v0, v1) and torch.equal(p0, p1)
    again = session.ask("What is the code of the red door?", max_new_tokens=12)
    assert again.token_ids == first.token_ids
