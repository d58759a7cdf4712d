"""The engine worker: one thread owns the engine; requests wait their turn in a bounded queue.

Like nano-vllm's scheduler loop, the whole life of a request on the engine is one readable
method, :meth:`Worker.execute`: tokenize, find the longest stored context that prefixes the
prompt (:class:`~kvlab.server.store.ContextStore`) or encode the request's context and store
it, prefill only the remaining tokens on top of it, generate with the engine's own loop
(:meth:`Engine.decode`, token by token through ``on_token``), and roll the cache back to the
stored context. Requests run one at a time (no batching of decodes yet), in arrival order.

The HTTP side (:mod:`kvlab.server.app`) never touches the engine: it queues a :class:`Job` and
reads the events the worker posts to the job's asyncio queue (``delta`` text pieces, then
``done``, ``error`` or ``cancelled``). A job whose client left is cancelled: the worker stops
at its next token (or skips it while queued) and frees what it held.

What a request's *context* is (the part encoded, compressed and stored for reuse):

- chat with messages before the last user message (a system prompt or document, earlier
  turns): everything rendered before the last user message's content; the question is then
  appended uncompressed, so the compression is query-agnostic, as in SCBench's multi-request
  mode, and every question after the same system prompt reuses it;
- otherwise (one user message, or a completion prompt): the whole prompt, compressed with the
  question in it, as :meth:`Engine.generate` does; a later prompt that extends it (the next turn
  of a chat, a continuation) reuses it.

A request that matches a stored context shorter than its own context prefills the difference
uncompressed and stores nothing new (the stored context keeps serving).

Contexts loaded from files (``kvlab serve --load-context``, written by ``kvlab cache save`` or
``Session.save``) are stored under the :data:`SHARED` tenant, which every tenant's requests
also match: the operator chose to serve them to all. A saved session's cache holds the chat
template's start and the context of the first user message; a chat request whose rendered
prompt starts with that text is tokenized as the session tokenized it (the context's tokens,
then the rest's), so its prompt tokens start with the loaded context's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvlab.engine.engine import Engine
from kvlab.engine.rotary import head_dim
from kvlab.errors import InputError, KvlabError
from kvlab.reuse.session import Session
from kvlab.server.documents import DocumentServer
from kvlab.server.metrics import Metrics
from kvlab.server.protocol import ApiError, GenerationRequest, TextStream
from kvlab.server.store import ContextStore, Entry

log = logging.getLogger("kvlab.server")

COMPLETION_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of ``/v1/completions``."""
CHAT_MAX_TOKENS = 512
"""Default ``max_tokens`` of a chat request (less where the window has less room)."""
_SPLIT = "\u2063KVLAB_QUESTION\u2063"
SHARED = "*"
"""The tenant of contexts loaded from files: matched by every tenant's requests."""


@dataclass(eq=False)
class Job:
    """One request waiting for, or on, the engine; ``events`` is read by the HTTP side."""

    request: GenerationRequest
    tenant: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the HTTP side (from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the server's loop is closed: nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(frozen=True)
class Outcome:
    """What a finished request reports: the text not sent yet, why it stopped, and usage."""

    rest: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    kv_bytes: int

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "kv_bytes": self.kv_bytes,
        }


class Worker:
    """The engine's one thread and its queue (``max_queue`` waiting requests at most)."""

    def __init__(self, engine: Engine, store: ContextStore, metrics: Metrics, max_queue: int) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.max_queue = max_queue
        self.running: Job | None = None
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._mean_latency = 1.0
        self.loaded: list[tuple[str, str]] = []  # (text, recipe) of contexts loaded from files
        self.documents = DocumentServer(engine, metrics, store.max_bytes, self.check_memory)
        """Requests that name documents (``kvlab.documents``, APE): :mod:`kvlab.server.documents`."""
        self._thread = threading.Thread(target=self._run, name="kvlab-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what is queued or running and stop the thread."""
        with self._wake:
            self._closed = True
            for job in [*self._queue, *([self.running] if self.running else [])]:
                job.cancel()
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when ``max_queue`` requests already wait."""
        with self._wake:
            if len(self._queue) >= self.max_queue or self._closed:
                return False
            self._queue.append(job)
            self.metrics.queue_length.set(len(self._queue))
            self._wake.notify()
            return True

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the mean latency times the requests ahead."""
        return max(1, math.ceil(self._mean_latency * (len(self._queue) + 1)))

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                self.metrics.queue_length.set(len(self._queue))
                if job.cancelled.is_set():
                    continue
                self.running = job
            try:
                self.execute(job)
            finally:
                self.running = None

    def load_context(self, session: Session) -> Entry:
        """Store a saved multi-request session's context under :data:`SHARED` (before the
        engine thread starts); an :class:`InputError` when it cannot serve or cannot fit."""
        if session.mode != "multi-request":
            raise InputError(f"a loaded context must be saved in multi-request mode, not {session.mode!r}")
        ids = self.engine.prompt_format.encode(session.transcript, first=True)
        recipe = str(session.recipe)
        entry = self.store.add((SHARED, self.engine.name, recipe), ids, session.sequence, None)
        self.store.release(entry)
        if not entry.stored:
            raise InputError(
                f"a loaded context of {entry.nbytes / 2**20:.1f} MiB does not fit the cache cap of "
                f"{self.store.max_bytes / 2**20:.1f} MiB (--max-cache-gib) with the others"
            )
        self.loaded.append((session.transcript, recipe))
        self.metrics.kv_bytes_held.set(self.store.held_bytes)
        self.metrics.cached_contexts.set(len(self.store))
        return entry

    # -- one request on the engine ----------------------------------------------------------
    def execute(self, job: Job) -> None:
        """Serve ``job`` (see the module docstring); every outcome is posted as an event."""
        self.metrics.running.inc()
        entry: Entry | None = None
        try:
            entry, outcome = self._generate(job, job.request)
            if job.cancelled.is_set():
                job.post("cancelled")
                return
            latency = time.perf_counter() - job.arrived
            self._mean_latency = 0.8 * self._mean_latency + 0.2 * latency
            self.metrics.latency.observe(latency)
            self.metrics.prompt_tokens.inc(outcome.prompt_tokens)
            self.metrics.cached_tokens.inc(outcome.cached_tokens)
            self.metrics.completion_tokens.inc(outcome.completion_tokens)
            job.post("done", outcome)
        except ApiError as exc:
            job.post("error", exc)
        except KvlabError as exc:
            job.post("error", ApiError(400, str(exc), code="invalid_request"))
        except Exception as exc:  # a bug: answer 500, keep serving
            log.exception("request %s failed", job.request.id)
            job.post("error", ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            if entry is not None:
                self.store.release(entry)
            self.metrics.running.dec()
            self.metrics.kv_bytes_held.set(self.store.held_bytes)
            self.metrics.cached_contexts.set(len(self.store))

    def _generate(self, job: Job, request: GenerationRequest) -> tuple[Entry | None, Outcome]:
        if request.documents:  # APE: documents encoded once each, joined for the question
            return None, self.documents.generate(job, request)
        engine = self.engine
        ids, context_tokens = self.tokenize(request)
        window = engine.context_window(request.recipe)
        max_tokens = request.max_tokens
        if max_tokens is None:
            default = CHAT_MAX_TOKENS if request.kind == "chat" else COMPLETION_MAX_TOKENS
            max_tokens = max(1, min(default, window - len(ids)))
        engine.check_fits(request.recipe, len(ids), max_tokens, allow_overflow=False)
        self.check_memory(len(ids) + max_tokens)
        namespace = (job.tenant, engine.name, str(request.recipe))
        entry = self._match(namespace, ids)
        if entry is None:
            self.metrics.cache_misses.inc()
            self._evict(self.full_bytes(context_tokens))
            sequence = engine.new_sequence(request.recipe)
            logits = engine.prefill(sequence, ids[:context_tokens], compress=True, progress=False)
            entry = self._evict_around(lambda: self.store.add(namespace, ids[:context_tokens], sequence, logits))
            cached = 0
        else:
            self.metrics.cache_hits.inc()
            cached = len(entry.tokens)
        sequence = entry.sequence
        mark = sequence.mark()
        text = TextStream(engine.tokenizer, request.stop)
        first_token: list[float] = []

        def on_token(token: int) -> bool:
            if job.cancelled.is_set():
                return False
            if not first_token:
                first_token.append(time.perf_counter())
                self.metrics.ttft.observe(first_token[0] - job.arrived)
            piece = text.feed(token)
            if piece:
                job.post("delta", piece)
            return not text.stopped

        try:
            rest = ids[len(entry.tokens):]
            logits = engine.prefill(sequence, rest, compress=False, progress=False) if rest else entry.logits
            sampler = request.sampling.sampler(engine.device)
            decoded = engine.decode(sequence, logits, max_tokens, sampler, on_token=on_token)
            kv_bytes = sequence.nbytes()
        finally:
            sequence.rollback(mark)  # the stored context is as it was, for the next request
        stopped = text.stopped or (decoded.tokens and decoded.tokens[-1] in engine.stop_ids)
        outcome = Outcome(
            rest=text.rest(), finish_reason="stop" if stopped else "length",
            prompt_tokens=len(ids), completion_tokens=len(decoded.tokens), cached_tokens=cached,
            kv_bytes=kv_bytes,
        )
        return entry, outcome

    def _match(self, namespace: tuple[str, str, str], ids: list[int]) -> Entry | None:
        """The longest stored context prefixing ``ids``: the tenant's own or a loaded one."""
        found = [e for e in (self.store.match(namespace, ids), self.store.match((SHARED, *namespace[1:]), ids)) if e]
        found.sort(key=lambda e: len(e.tokens), reverse=True)
        for extra in found[1:]:
            self.store.release(extra)
        entry = found[0] if found else None
        if entry is not None and entry.logits is None and len(entry.tokens) == len(ids):
            self.store.release(entry)  # the prompt is exactly a loaded context: no logits kept
            return None
        return entry

    def tokenize(self, request: GenerationRequest) -> tuple[list[int], int]:
        """The prompt's token ids and how many of the first are its context (module docstring)."""
        fmt = self.engine.prompt_format
        if request.kind == "completion":
            ids = fmt.encode(request.prompt, first=True)
            return ids, len(ids)
        messages = list(request.messages)
        full = fmt.render(messages)
        recipe = str(request.recipe)
        loaded = [t for t, r in self.loaded if r == recipe and full.startswith(t) and len(full) > len(t)]
        if loaded:
            text = max(loaded, key=len)
            head_ids = fmt.encode(text, first=True)
            return head_ids + fmt.encode(full[len(text):], first=False), len(head_ids)
        if len(messages) > 1:
            last = {"role": "user", "content": _SPLIT + messages[-1]["content"]}
            head = fmt.render([*messages[:-1], last]).split(_SPLIT)[0]
            if head and full.startswith(head) and len(full) > len(head):
                head_ids = fmt.encode(head, first=True)
                return head_ids + fmt.encode(full[len(head):], first=False), len(head_ids)
        ids = fmt.encode(full, first=True)
        return ids, len(ids)

    # -- memory ------------------------------------------------------------------------------
    def full_bytes(self, tokens: int) -> int:
        """Bytes of an uncompressed cache of ``tokens`` (keys and values, every layer): what a
        prefill holds before any compression, an upper bound of what a request allocates."""
        config = self.engine.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        itemsize = next(self.engine.model.parameters()).element_size()
        return 2 * config.num_hidden_layers * heads * head_dim(config) * itemsize * tokens

    def check_memory(self, tokens: int) -> None:
        """Refuse, before allocating, a request whose cache alone would exceed the cap."""
        need = self.full_bytes(tokens)
        if need > self.store.max_bytes:
            raise ApiError(
                413,
                f"this request's cache ({tokens} tokens with max_tokens: {need / 2**20:.1f} MiB "
                f"uncompressed) exceeds the server's cache cap of {self.store.max_bytes / 2**20:.1f} "
                "MiB (--max-cache-gib); shorten the prompt or max_tokens",
                code="context_too_large",
            )

    def _evict(self, nbytes: int) -> None:
        self.metrics.cache_evictions.inc(self.store.make_room(nbytes))

    def _evict_around(self, add: Any) -> Entry:
        before = self.store.evictions
        entry = add()
        self.metrics.cache_evictions.inc(self.store.evictions - before)
        return entry


__all__ = ["CHAT_MAX_TOKENS", "COMPLETION_MAX_TOKENS", "Job", "Outcome", "Worker"]
