"""Fixtures of the server tests: the real server (uvicorn on a free loopback port, in a thread)
over a tiny random-weight model with SmolLM2's tokenizer, and clients to talk to it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx2
import openai
import pytest
import uvicorn

from kvlab.server import ServerConfig, create_app
from tests.conftest import tiny_engine


class Running:
    """A server running in this process: its base URL and its app (to look inside)."""

    def __init__(self, url: str, app) -> None:
        self.url = url
        self.app = app
        self.clients: list = []  # closed when the server stops

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, key: str = "none") -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)
        self.clients.append(client)
        return client

    def http(self) -> httpx2.Client:
        """A raw HTTP client; use it in a ``with`` block."""
        return httpx2.Client(base_url=self.url, timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from GET /metrics (0 when absent)."""
        with self.http() as http:
            text = http.get("/metrics").text
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0


@contextmanager
def running(engine, config: ServerConfig) -> Iterator[Running]:
    app = create_app(engine, config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    server_handle = Running(f"http://127.0.0.1:{port}", app)
    try:
        yield server_handle
    finally:
        for client in server_handle.clients:
            client.close()
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def engine(tokenizer):
    """A tiny random-weight Llama with SmolLM2's tokenizer and chat template (2,048-token window)."""
    return tiny_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048)


@pytest.fixture()
def serve(engine) -> Callable[..., Running]:
    """``serve(**ServerConfig fields)`` starts a server on the shared engine; stopped after the test."""
    stack = []

    def start(**config) -> Running:
        cm = running(engine, ServerConfig(**config))
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
