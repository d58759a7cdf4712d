"""Concurrent requests on the real server: decoded together in one forward per step where the
recipe batches, each answer token for token the one served alone; a recipe that does not batch
is served beside them; a client leaving a batch frees only its request."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kvlab.compress.snapkv import SnapKV
from tests.server.test_load import wait_for
from tests.server.test_server import DOCUMENT, chat

MAX_TOKENS = 8
SNAP = "snapkv(budget=0.5)"


class Steps(list):
    """The recipes of each decoding forward; ``release`` lets the first one run."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.delay = 0.0  # seconds added to each decoding forward


@pytest.fixture()
def steps(engine, monkeypatch):
    """Record the recipes of every decoding forward (one list per :meth:`Engine.decode_step`);
    the first waits until ``steps.release`` is set, so that the requests of a test queue up
    behind the first one and are admitted together."""
    record = Steps()
    step = engine.decode_step

    def recorded(sequences, tokens):
        record.release.wait(30)
        record.append([str(s.recipe) for s in sequences])
        time.sleep(record.delay)
        return step(sequences, tokens)

    monkeypatch.setattr(engine, "decode_step", recorded)
    yield record
    record.release.set()


REQUESTS = [  # prompts of different lengths; two on one shared document (forks of one stored context)
    ("chat", chat(DOCUMENT, "What is the code?")),
    ("chat", chat(DOCUMENT, "Who keeps the red door code, and since when?")),
    ("completion", "The red door"),
    ("completion", "Alice keeps the red door code. The code of the red door is 4417. Bob asks Alice for"),
]


def send(client, name: str, kind: str, prompt, recipe: str | None = None) -> str:
    extra = {"extra_body": {"kvlab": {"recipe": recipe}}} if recipe else {}
    if kind == "chat":
        out = client.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=MAX_TOKENS, **extra)
        return out.choices[0].message.content
    out = client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, **extra)
    return out.choices[0].text


def concurrently(server, requests, steps) -> list[str]:
    """Send ``requests`` at once (``(kind, prompt, recipe)``); every one is admitted before the
    first decoding step runs. Returns the answers in order."""
    answers: list[str | None] = [None] * len(requests)
    name = server.engine.name

    def one(i, kind, prompt, recipe):
        answers[i] = send(server.client(), name, kind, prompt, recipe)

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    worker = server.app.state.worker
    wait_for(lambda: len(worker.running) + worker.queued == len(requests))
    steps.release.set()
    for thread in threads:
        thread.join(60)
    assert all(a is not None for a in answers)
    return answers


def alone(serve, requests) -> list[str]:
    """The same requests served one at a time (``max_batch=1``), one after the other."""
    server = serve(max_batch=1)
    return [send(server.client(), server.engine.name, kind, prompt, recipe) for kind, prompt, recipe in requests]


def test_concurrent_requests_decode_in_one_forward_and_answer_as_alone(serve, steps):
    requests = [(kind, prompt, None) for kind, prompt in REQUESTS]
    server = serve()
    answers = concurrently(server, requests, steps)
    assert max(len(s) for s in steps) == len(REQUESTS)  # all four decoded in one forward
    assert sum(len(s) for s in steps) == len(REQUESTS) * (MAX_TOKENS - 1)  # each token forwarded once
    assert server.app.state.store.entries()[0].pins == 0
    assert answers == alone(serve, requests)
    assert len(set(answers)) > 1  # different prompts: the rows were not mixed up into one answer


def test_a_recipe_that_does_not_batch_is_served_beside_the_batch(serve, steps, monkeypatch):
    monkeypatch.setattr(SnapKV, "batches_decode", False)  # as a method whose decoding cannot share a forward
    requests = [(kind, prompt, SNAP if i % 2 else None) for i, (kind, prompt) in enumerate(REQUESTS)]
    server = serve()
    answers = concurrently(server, requests, steps)
    snap = [s for s in steps if any(r.startswith("snapkv") for r in s)]
    assert snap and all(len(s) == 1 for s in snap)  # each in a forward of its own
    assert max(len(s) for s in steps) == 2  # the two full requests together
    assert answers == alone(serve, requests)


def test_a_client_leaving_a_batch_frees_only_its_request(serve, engine, steps):
    server = serve()
    name, worker = engine.name, server.app.state.worker
    steps.delay = 0.02  # ~50 steps per second at most: the server notices the leave within a few
    body = lambda q: {"model": name, "messages": chat(DOCUMENT, q), "max_tokens": 60, "temperature": 0,  # noqa: E731
                      "stream": True, "stream_options": {"include_usage": True}}
    questions = ["What is the code?", "Who keeps it?", "Which door?"]
    usage: dict[str, dict] = {}

    def stay(question):
        with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body(question)) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and '"usage": {' in line:
                    usage[question] = json.loads(line[6:])["usage"]

    def leave(question):
        with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body(question)) as response:
            lines = response.iter_lines()
            next(line for line in lines if '"content"' in line)  # a token arrived: then leave

    threads = [threading.Thread(target=stay, args=(q,)) for q in questions[:2]]
    threads.append(threading.Thread(target=leave, args=(questions[2],)))
    for n, thread in enumerate(threads, 1):  # the one that leaves comes last: admitted with the batch
        thread.start()
        wait_for(lambda: len(worker.running) + worker.queued == n)
    steps.release.set()
    for thread in threads:
        thread.join(60)
    wait_for(lambda: not worker.running and server.metric("kvlab_running_requests") == 0)
    sizes = [len(s) for s in steps]
    assert max(sizes) == 3 and 2 in sizes[sizes.index(3):]  # the batch went on with the other two
    assert sizes.count(3) < 30  # the one that left stopped soon, far from its 60 tokens
    assert [usage[q]["completion_tokens"] for q in questions[:2]] == [60, 60]
    assert server.metric("kvlab_requests_total", endpoint="/v1/chat/completions", status="499") == 1
    assert server.metric("kvlab_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert server.metric("kvlab_completion_tokens_total") == 120  # the one that left is not counted
    [entry] = server.app.state.store.entries()
    assert entry.pins == 0 and entry.sequence.seen == len(entry.tokens)  # stored as it was, unpinned


def test_requests_wait_for_memory_rather_than_run_past_the_cache_cap(serve, steps):
    steps.release.set()  # the probe runs freely
    probe = serve()
    out = probe.client().chat.completions.create(model=probe.engine.name, messages=chat(DOCUMENT, "Code?"),
                                                 temperature=0, max_tokens=MAX_TOKENS)
    [stored] = probe.app.state.store.entries()
    one = probe.app.state.worker.full_bytes(out.usage.prompt_tokens + MAX_TOKENS)
    server = serve(max_cache_bytes=stored.nbytes + one + one // 2)  # the context and one request's cache
    steps.release.clear()
    steps.clear()
    requests = [("chat", chat(DOCUMENT, q), None) for q in ("Code?", "Who?", "Door?")]
    answers = concurrently(server, requests, steps)
    assert max(len(s) for s in steps) == 1  # one at a time: each waited for the one before
    assert server.metric("kvlab_cache_evictions_total") == 0  # the context in use stayed stored
    assert answers == alone(serve, requests)
