"""The HTTP side: an OpenAI-compatible FastAPI app over one engine worker.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON, or Server-Sent
Events with ``stream: true``, ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Errors use OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``): 400 for a bad field or recipe, 401 for a
missing or wrong key, 404 for another model's name, 413 for a request whose cache alone would
exceed the cache cap, 503 with ``Retry-After`` when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvlab.engine.engine import Engine
from kvlab.recipe import Recipe, parse_recipe
from kvlab.reuse.session import Session
from kvlab.server.auth import tenant_of
from kvlab.server.metrics import Metrics
from kvlab.server.protocol import ApiError, GenerationRequest, Outcome, parse_request
from kvlab.server.store import ContextStore
from kvlab.server.worker import Job, Worker

CANCELLED = "499"
"""The status counted for a request whose client left before its answer (nginx's code)."""


@dataclass(frozen=True)
class ServerConfig:
    """What ``kvlab serve``'s flags set: the default ``recipe``, the cache cap in bytes, the
    most requests waiting, the API keys (key -> tenant; None: no key needed), files of
    saved contexts to serve to every tenant (``kvlab cache save``), and the most requests
    decoding at once (their steps batched: :mod:`kvlab.server.worker`)."""

    recipe: str = "full"
    max_cache_bytes: int = 4 * 2**30
    max_queue: int = 64
    api_keys: dict[str, str] | None = None
    contexts: tuple[str, ...] = ()
    max_batch: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue!r}: must be an integer >= 0")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch!r}: must be an integer >= 1")


def create_app(
    engine: Engine, config: ServerConfig | None = None, on_stop: Callable[[], None] | None = None,
) -> FastAPI:
    """The server app for a loaded ``engine`` (an in-memory model works: tests build one).
    The engine thread starts and stops with the app's lifespan; ``on_stop`` is called once
    it has stopped. A context file of ``config.contexts`` that does not match the engine is
    an :class:`InputError` here."""
    config = config or ServerConfig()
    default_recipe: Recipe = parse_recipe(config.recipe)
    metrics = Metrics()
    store = ContextStore(config.max_cache_bytes)
    worker = Worker(engine, store, metrics, config.max_queue, config.max_batch)
    for path in config.contexts:  # checked now: a wrong file stops the server before it listens
        worker.load_context(Session.load(engine, path))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.close()
            if on_stop is not None:
                on_stop()

    app = FastAPI(title="kvlab", lifespan=lifespan)
    app.state.engine, app.state.worker, app.state.store, app.state.metrics = engine, worker, store, metrics

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def authorize(request: Request) -> str:
        tenant = tenant_of(config.api_keys, request.headers.get("authorization"))
        if tenant is None:
            given = "no key" if not request.headers.get("authorization") else "a wrong key"
            raise ApiError(
                401, f"this server needs an API key ('Authorization: Bearer KEY'); the request sent {given}",
                code="invalid_api_key",
            )
        return tenant

    async def generate(request: Request, kind: str) -> Response:
        tenant = authorize(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not JSON: {exc}", code="invalid_json") from None
        parsed = parse_request(kind, body, default_recipe)
        if parsed.model != engine.name:
            raise ApiError(
                404, f"model {parsed.model!r} is not served here; this server serves {engine.name!r}",
                param="model", code="model_not_found",
            )
        job = Job(parsed, tenant, asyncio.get_running_loop())
        if not worker.submit(job):
            raise ApiError(
                503, f"the server is busy: {worker.max_queue} requests are already waiting "
                "(--max-queue); retry later", code="queue_full",
                headers={"Retry-After": str(worker.retry_after())},
            )
        path = request.url.path
        try:
            first = await job.events.get()  # the first token, or an error with its own status
        except asyncio.CancelledError:
            job.cancel()
            metrics.requests.labels(path, CANCELLED).inc()
            raise
        if first[0] == "error":
            raise first[1]
        if parsed.stream:
            return StreamingResponse(_stream(job, path, first), media_type="text/event-stream")
        text: list[str] = []
        event, payload = first
        try:
            while event == "delta":
                text.append(payload)
                event, payload = await job.events.get()
        except asyncio.CancelledError:
            job.cancel()
            metrics.requests.labels(path, CANCELLED).inc()
            raise
        if event == "error":
            raise payload
        if event != "done":
            metrics.requests.labels(path, CANCELLED).inc()
            return Response(status_code=499)
        metrics.requests.labels(path, "200").inc()
        return JSONResponse(_response(parsed, engine.name, "".join(text) + payload.rest, payload))

    async def _stream(job: Job, path: str, first: tuple[str, Any]) -> AsyncIterator[str]:
        """SSE chunks as OpenAI sends them, from the ``first`` event on; a client that leaves
        cancels the job (the generator is cancelled or closed, and ``finally`` runs)."""
        parsed, finished, pending = job.request, False, [first]
        try:
            if parsed.kind == "chat":
                yield _sse(_chunk(parsed, engine.name, {"role": "assistant", "content": ""}))
            while True:
                event, payload = pending.pop() if pending else await job.events.get()
                if event == "delta":
                    yield _sse(_chunk(parsed, engine.name, _delta(parsed, payload)))
                elif event == "done":
                    if payload.rest:
                        yield _sse(_chunk(parsed, engine.name, _delta(parsed, payload.rest)))
                    yield _sse(_chunk(parsed, engine.name, _delta(parsed, None), payload.finish_reason))
                    if parsed.include_usage:
                        yield _sse({**_chunk(parsed, engine.name, None), "choices": [], "usage": payload.usage()})
                    yield "data: [DONE]\n\n"
                    finished = True
                    metrics.requests.labels(path, "200").inc()
                    return
                elif event == "error":
                    finished = True
                    metrics.requests.labels(path, str(payload.status)).inc()
                    yield _sse(payload.body())
                    return
                else:
                    return
        finally:
            if not finished:
                job.cancel()
                metrics.requests.labels(path, CANCELLED).inc()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": 0, "owned_by": "kvlab"},
        ]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok", "model": engine.name, "recipe": str(default_recipe),
            "queued": worker.queued, "running": len(worker.running),
            "cached_contexts": len(store), "cache_bytes": store.held_bytes,
            "max_cache_bytes": store.max_bytes,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _delta(request: GenerationRequest, text: str | None) -> dict[str, Any] | str:
    """A chunk's choice payload: ``{"content": ...}`` for chat, the text for a completion."""
    if request.kind == "chat":
        return {} if text is None else {"content": text}
    return text or ""


def _chunk(request: GenerationRequest, model: str, delta: Any, finish_reason: str | None = None) -> dict[str, Any]:
    if request.kind == "chat":
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": f"chatcmpl-{request.id}", "object": "chat.completion.chunk", "created": request.created,
                "model": model, "system_fingerprint": None, "choices": [choice]}
    choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"id": f"cmpl-{request.id}", "object": "text_completion", "created": request.created,
            "model": model, "system_fingerprint": None, "choices": [choice]}


def _response(request: GenerationRequest, model: str, text: str, outcome: Outcome) -> dict[str, Any]:
    if request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": outcome.finish_reason}
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
        kind, prefix = "text_completion", "cmpl"
    return {"id": f"{prefix}-{request.id}", "object": kind, "created": request.created, "model": model,
            "system_fingerprint": None, "choices": [choice], "usage": outcome.usage()}


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve ``app`` (:func:`create_app`) until SIGINT or SIGTERM. uvicorn's handlers shut down
    gracefully (responses in flight end, the engine thread stops, ``on_stop`` runs), then
    re-raise the signal, so the process ends as that signal's default says (SIGTERM: -15)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["CANCELLED", "ServerConfig", "create_app", "serve"]
