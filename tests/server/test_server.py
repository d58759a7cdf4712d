"""The real server over HTTP, with the official ``openai`` client and raw requests."""

from __future__ import annotations

import json

import openai
import pytest

import kvlab

DOCUMENT = "Alice keeps the red door code. The code of the red door is 4417. " * 12
GREEDY = dict(temperature=0, max_tokens=6)


def chat(document: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": document}, {"role": "user", "content": question}]


def test_completion_and_models(serve):
    server = serve()
    client = server.client()
    [model] = client.models.list().data
    assert model.id == server.engine.name
    out = client.completions.create(model=model.id, prompt="The code of the red door is", **GREEDY)
    ids = server.engine.tokenizer("The code of the red door is", add_special_tokens=False)["input_ids"]
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 6
    assert out.usage.model_extra["kv_bytes"] > 0
    # the same greedy tokens as the engine's own loop on the same prompt
    reference = server.engine.generate_ids(ids, max_new_tokens=6)
    assert out.choices[0].text == reference.text


def test_chat_answers_like_a_session(serve):
    server = serve()
    out = server.client().chat.completions.create(
        model=server.engine.name, messages=[{"role": "user", "content": DOCUMENT + "\n\nWhat is the code?"}],
        **GREEDY,
    )
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    session = server.engine.session(DOCUMENT).ask("What is the code?", max_new_tokens=6)
    assert out.choices[0].message.content == session.text
    assert out.usage.completion_tokens == 6


def test_streaming_sends_the_same_text_in_chunks_then_done(serve):
    server = serve()
    client = server.client()
    whole = client.chat.completions.create(model=server.engine.name, messages=chat(DOCUMENT, "Code?"), **GREEDY)
    chunks = list(client.chat.completions.create(
        model=server.engine.name, messages=chat(DOCUMENT, "Code?"), stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []
    with server.http() as http:  # raw SSE: data lines, [DONE] last
        body = {"model": server.engine.name, "prompt": "Once upon", "max_tokens": 3, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_bad_recipe_is_a_400_with_the_recipe_error(serve):
    server = serve()
    with pytest.raises(kvlab.RecipeError) as expected:
        kvlab.parse_recipe("snapkv(budgt=0.25)")
    with pytest.raises(openai.BadRequestError) as got:
        server.client().chat.completions.create(
            model=server.engine.name, messages=chat(DOCUMENT, "Code?"), max_tokens=2,
            extra_body={"kvlab": {"recipe": "snapkv(budgt=0.25)"}},
        )
    assert got.value.status_code == 400
    assert str(expected.value) in got.value.body["message"]


@pytest.mark.parametrize("field, value, words", [
    ("logprobs", True, ["'logprobs'", "max_tokens", "stream"]),
    ("n", 2, ["n=2", "n=1"]),
    ("temperature", 3, ["temperature=3", "[0, 2]"]),
    ("kvlab", {"recipes": "full"}, ["kvlab=", "recipe"]),
])
def test_unsupported_fields_are_400_naming_the_value_and_the_allowed_ones(serve, field, value, words):
    server = serve()
    body = {"model": server.engine.name, "prompt": "hi", "max_tokens": 1, field: value}
    with server.http() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert all(w in message for w in words), message


def test_a_wrong_model_name_is_a_404(serve):
    server = serve()
    with pytest.raises(openai.NotFoundError, match="serves"):
        server.client().completions.create(model="gpt-4", prompt="hi", max_tokens=1)


def test_a_shared_system_prompt_is_encoded_once_and_reused(serve):
    server = serve()
    client, engine = server.client(), server.engine
    first = client.chat.completions.create(model=engine.name, messages=chat(DOCUMENT, "What is the code?"), **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    prefilled = engine.counters.prefilled_tokens
    second = client.chat.completions.create(model=engine.name, messages=chat(DOCUMENT, "Who keeps it?"), **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens
    # only the question was prefilled: the document came from the store
    assert engine.counters.prefilled_tokens - prefilled == second.usage.prompt_tokens - cached
    assert server.metric("kvlab_cache_hits_total") == 1 and server.metric("kvlab_cached_tokens_total") == cached
    # the reused cache answers as a cold one does (full recipe, greedy), and is left as stored
    again = client.chat.completions.create(model=engine.name, messages=chat(DOCUMENT, "Who keeps it?"), **GREEDY)
    cold = serve().client().chat.completions.create(model=engine.name, messages=chat(DOCUMENT, "Who keeps it?"), **GREEDY)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == again.choices[0].message.content == cold.choices[0].message.content
    [entry] = server.app.state.store.entries()
    assert len(entry.tokens) == cached and entry.sequence.seen == cached and entry.pins == 0


def test_a_compressed_context_is_reused_under_its_own_recipe_only(serve):
    server = serve()
    client, name = server.client(), server.engine.name
    snap = {"kvlab": {"recipe": "snapkv(budget=0.25)"}}
    full = client.chat.completions.create(model=name, messages=chat(DOCUMENT, "Code?"), **GREEDY)
    first = client.chat.completions.create(model=name, messages=chat(DOCUMENT, "Code?"), extra_body=snap, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # another recipe: another namespace
    assert first.usage.model_extra["kv_bytes"] < full.usage.model_extra["kv_bytes"] / 2
    second = client.chat.completions.create(model=name, messages=chat(DOCUMENT, "Who?"), extra_body=snap, **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.model_extra["kv_bytes"] < full.usage.model_extra["kv_bytes"] / 2
    [entry] = [e for e in server.app.state.store.entries() if "snapkv" in e.namespace[2]]
    assert entry.pins == 0 and entry.sequence.mean_entries() < len(entry.tokens) / 2


def test_the_whole_prompt_is_reused_by_the_next_turn(serve):
    server = serve()
    client, name = server.client(), server.engine.name
    turn = [{"role": "user", "content": DOCUMENT + "\n\nWhat is the code?"}]
    first = client.chat.completions.create(model=name, messages=turn, **GREEDY)
    following = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "And who keeps it?"}]
    second = client.chat.completions.create(model=name, messages=following, **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens


def test_a_compressed_answer_is_the_engines_own_on_the_same_split(serve):
    """Written out with the engine's public API: the head (system prompt) prefilled and
    compressed as a context, the question appended, greedy decoding: the server's answer,
    cold and reused, is exactly that."""
    server = serve()
    engine, fmt = server.engine, server.engine.prompt_format
    messages = chat(DOCUMENT, "Code?")
    full = fmt.render(messages)
    head = full[: full.index("Code?")]
    head_ids, rest_ids = fmt.encode(head, first=True), fmt.encode(full[len(head):], first=False)
    sequence = engine.new_sequence("snapkv(budget=0.25)")
    engine.prefill(sequence, head_ids, compress=True)
    logits = engine.prefill(sequence, rest_ids, compress=False)
    reference = engine.decode(sequence, logits, 6, kvlab.engine.sampling.Sampling().sampler(engine.device))
    snap = {"kvlab": {"recipe": "snapkv(budget=0.25)"}}
    client = server.client()
    cold = client.chat.completions.create(model=engine.name, messages=messages, extra_body=snap, **GREEDY)
    hit = client.chat.completions.create(model=engine.name, messages=messages, extra_body=snap, **GREEDY)
    expected = engine.tokenizer.decode(reference.tokens, skip_special_tokens=True)
    assert hit.usage.prompt_tokens_details.cached_tokens == len(head_ids)
    assert cold.choices[0].message.content == hit.choices[0].message.content == expected


def test_a_prompt_past_the_window_is_a_400_streaming_or_not(serve):
    server = serve()
    body = {"model": server.engine.name, "prompt": "word " * 3000, "max_tokens": 2}
    with server.http() as http:
        for stream in (False, True):
            response = http.post("/v1/completions", json={**body, "stream": stream})
            assert response.status_code == 400 and "yarn" in response.json()["error"]["message"]
