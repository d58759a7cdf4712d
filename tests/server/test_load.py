"""Keys and tenants, the queue, cancellation and metrics of the real server."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from tests.server.test_server import DOCUMENT, GREEDY, chat


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture()
def keys():
    return {"sk-alice": "alice", "sk-bob": "bob"}


def test_a_missing_or_wrong_key_is_a_401(serve, keys):
    server = serve(api_keys=keys)
    for key in ("none", "sk-alic", "sk-alice2"):
        with pytest.raises(openai.AuthenticationError, match="API key"):
            server.client(key).completions.create(model=server.engine.name, prompt="hi", max_tokens=1)
    with server.http() as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200  # probes need no key
    out = server.client("sk-alice").completions.create(model=server.engine.name, prompt="hi", max_tokens=1)
    assert out.usage.completion_tokens == 1
    assert server.metric("kvlab_requests_total", endpoint="/v1/completions", status="401") == 3


def test_tenants_never_share_an_encoded_context(serve, keys):
    server = serve(api_keys=keys)
    name = server.engine.name
    alice, bob = server.client("sk-alice"), server.client("sk-bob")
    alice.chat.completions.create(model=name, messages=chat(DOCUMENT, "Code?"), **GREEDY)
    hit = alice.chat.completions.create(model=name, messages=chat(DOCUMENT, "Code?"), **GREEDY)
    assert hit.usage.prompt_tokens_details.cached_tokens > 0
    other = bob.chat.completions.create(model=name, messages=chat(DOCUMENT, "Code?"), **GREEDY)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert sorted(e.namespace[0] for e in server.app.state.store.entries()) == ["alice", "bob"]


@pytest.fixture()
def gate(engine, monkeypatch):
    """Hold every decoding forward of the engine until ``gate.set()`` (so a request stays on
    the engine as long as a test needs); set at the end of the test."""
    event = threading.Event()
    forward = engine.forward

    def held(sequence, ids, phase, *args, **kwargs):
        if len(ids) == 1:
            event.wait(30)
        return forward(sequence, ids, phase, *args, **kwargs)

    monkeypatch.setattr(engine, "forward", held)
    yield event
    event.set()


def test_beyond_max_queue_a_503_with_retry_after(serve, gate):
    server = serve(max_queue=1)
    name = server.engine.name
    results = {}

    def ask(label):
        results[label] = server.client().completions.create(model=name, prompt=f"Request {label}", **GREEDY)

    running = threading.Thread(target=ask, args=("a",))
    running.start()
    wait_for(lambda: len(server.app.state.worker.running) == 1)
    waiting = threading.Thread(target=ask, args=("b",))
    waiting.start()
    wait_for(lambda: server.app.state.worker.queued == 1)
    assert server.metric("kvlab_queue_length") == 1 and server.metric("kvlab_running_requests") == 1
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": name, "prompt": "c", "max_tokens": 1})
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert "--max-queue" in response.json()["error"]["message"]
    gate.set()
    running.join(30)
    waiting.join(30)
    assert results["a"].usage.completion_tokens == results["b"].usage.completion_tokens == 6
    assert server.metric("kvlab_requests_total", endpoint="/v1/completions", status="503") == 1
    assert server.metric("kvlab_requests_total", endpoint="/v1/completions", status="200") == 2


def test_a_client_that_leaves_mid_stream_cancels_its_generation(serve, engine, monkeypatch):
    server = serve()
    forward, steps = engine.forward, []

    def slow(sequence, ids, phase, *args, **kwargs):  # ~100 decoding steps per second at most
        if len(ids) == 1:
            steps.append(1)
            time.sleep(0.01)
        return forward(sequence, ids, phase, *args, **kwargs)

    monkeypatch.setattr(engine, "forward", slow)
    body = {"model": engine.name, "messages": chat(DOCUMENT, "Code?"), "max_tokens": 1000,
            "temperature": 0, "stream": True}
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            next(line for line in lines if '"content"' in line)  # a token arrived: then leave
    worker = server.app.state.worker
    wait_for(lambda: not worker.running and server.metric("kvlab_running_requests") == 0)
    assert len(steps) < 500  # stopped at the next token, far from max_tokens
    assert server.metric("kvlab_requests_total", endpoint="/v1/chat/completions", status="499") == 1
    assert server.metric("kvlab_completion_tokens_total") == 0  # nothing counted as answered
    [entry] = server.app.state.store.entries()  # its context stays stored, unpinned, as stored
    assert entry.pins == 0 and entry.sequence.seen == len(entry.tokens)
    # and the engine serves the next request
    out = server.client().chat.completions.create(model=engine.name, messages=chat(DOCUMENT, "Who?"), **GREEDY)
    assert out.usage.prompt_tokens_details.cached_tokens == len(entry.tokens)


def test_metrics_and_health(serve):
    server = serve(max_cache_bytes=2**30)
    client = server.client()
    client.chat.completions.create(model=server.engine.name, messages=chat(DOCUMENT, "Code?"), **GREEDY)
    client.chat.completions.create(model=server.engine.name, messages=chat(DOCUMENT, "Who?"), **GREEDY)
    with server.http() as http:
        text = http.get("/metrics").text
        health = http.get("/health").json()
    for name in ("kvlab_time_to_first_token_seconds_bucket", "kvlab_request_latency_seconds_count",
                 "kvlab_prompt_tokens_total", "kvlab_cache_evictions_total", "kvlab_queue_length"):
        assert name in text
    assert server.metric("kvlab_request_latency_seconds_count") == 2
    assert server.metric("kvlab_time_to_first_token_seconds_count") == 2
    assert server.metric("kvlab_cache_hits_total") == 1 and server.metric("kvlab_cache_misses_total") == 1
    held = server.app.state.store.held_bytes
    assert held > 0 and server.metric("kvlab_kv_bytes_held") == held == health["cache_bytes"]
    assert health["status"] == "ok" and health["cached_contexts"] == 1


def test_the_cache_cap_evicts_old_contexts_and_refuses_what_cannot_fit(serve):
    probe = serve()
    probe.client().chat.completions.create(model=probe.engine.name, messages=chat(DOCUMENT, "Code?"), **GREEDY)
    [stored] = probe.app.state.store.entries()
    server = serve(max_cache_bytes=stored.nbytes * 3 // 2)  # room for one such context, not two
    client, name = server.client(), server.engine.name
    client.chat.completions.create(model=name, messages=chat(DOCUMENT, "Code?"), **GREEDY)
    client.chat.completions.create(model=name, messages=chat("Bob. " + DOCUMENT, "Code?"), **GREEDY)
    assert server.metric("kvlab_cache_evictions_total") == 1 and len(server.app.state.store) == 1
    assert server.app.state.store.held_bytes <= stored.nbytes * 3 // 2
    again = client.chat.completions.create(model=name, messages=chat(DOCUMENT, "Code?"), **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # it was evicted
    with pytest.raises(openai.APIStatusError) as refused:  # its cache alone would pass the cap
        client.chat.completions.create(model=name, messages=chat(DOCUMENT * 6, "Code?"), **GREEDY)
    assert refused.value.status_code == 413 and "--max-cache-gib" in refused.value.message


def test_a_saved_context_is_served_after_a_restart_token_for_token(serve, engine, tmp_path, keys):
    """Encoded and saved by one process (a Session), loaded by a new server: the first
    request prefills only its question and answers as the session did."""
    session = engine.session(DOCUMENT, recipe="snapkv(budget=0.25)")
    path = tmp_path / "document.kv"
    session.save(path)
    expected = session.ask("What is the code?", max_new_tokens=6)
    server = serve(contexts=(str(path),), api_keys=keys)
    message = [{"role": "user", "content": DOCUMENT + "\n\nWhat is the code?"}]
    snap = {"kvlab": {"recipe": "snapkv(budget=0.25)"}}
    prefilled = engine.counters.prefilled_tokens
    for key in ("sk-alice", "sk-bob"):  # a loaded context serves every tenant
        out = server.client(key).chat.completions.create(model=engine.name, messages=message, extra_body=snap, **GREEDY)
        assert out.usage.prompt_tokens_details.cached_tokens == session.context_stats.prompt_tokens
        assert out.choices[0].message.content == expected.text
        assert out.usage.model_extra["kv_bytes"] == expected.stats.kv_bytes
    assert engine.counters.prefilled_tokens - prefilled == 2 * expected.stats.prefilled_tokens
    other = server.client("sk-alice").chat.completions.create(model=engine.name, messages=message, **GREEDY)
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # another recipe: not this context
