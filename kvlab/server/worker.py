"""The engine worker: one thread owns the engine; requests wait their turn in a bounded queue
and decode together.

Like nano-vllm's scheduler, the loop is one readable method, :meth:`Worker._run`: admit waiting
requests while the batch has room (``max_batch``, ``kvlab serve --max-batch``), prefilling each
on admission, then one decoding step of every running request (:meth:`Worker.step`), again and
again. Admitting a request (:meth:`Worker._prefill`): tokenize, find the longest stored context
that prefixes the prompt (:class:`~kvlab.server.store.ContextStore`) or encode the request's
context and store it, then prefill only the remaining tokens on a *fork* of it
(:meth:`Sequence.fork`: the stored tensors shared, the request's own tokens in storage of its
own), so that any number of requests decode on one stored context at once and the context
stays as stored. A step draws each request's next token, then runs the tokens of every request
whose recipe batches its decoding (:attr:`Recipe.batches_decode`) through the model in **one
forward** (:meth:`Engine.decode_step`: projections, MLP and LM head batched, each request
attending over its own cache with its own recipe, so answers are the ones it would get alone);
a request whose recipe does not batch gets a forward of its own in the same step. Prefills are
not batched and a long one holds the steps of the others until it ends (no chunked-prefill
interleaving).

Memory: each running request's fork holds its own copy of the context once it appends (the
first append moves a layer's entries to storage of its own), so a request is admitted only
while the stored contexts, the bytes reserved by the running requests and its own reserve
(an uncompressed cache of its prompt and ``max_tokens``, an upper bound) fit
``--max-cache-gib``; otherwise it waits at the head of the queue until running requests end
(:meth:`Worker.room_for`). A request whose cache alone exceeds the cap is refused (413).
The HTTP side (:mod:`kvlab.server.app`) never touches the engine: it queues a :class:`Job` and
reads the events the worker posts to the job's asyncio queue (``delta`` text pieces, then
``done``, ``error`` or ``cancelled``). A job whose client left is cancelled: the worker takes
it off the batch at its next step (or skips it while queued) and frees what it held (its fork,
its pin on the stored context); the others of the batch go on.

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

from torch import Tensor

from kvlab.engine.engine import Engine
from kvlab.engine.rotary import head_dim
from kvlab.engine.sampling import TokenSampler
from kvlab.engine.sequence import Sequence
from kvlab.errors import InputError, KvlabError
from kvlab.reuse.session import Session
from kvlab.server.documents import DocumentServer
from kvlab.server.metrics import Metrics
from kvlab.server.protocol import ApiError, GenerationRequest, Outcome, TextStream
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


@dataclass(eq=False)
class Active:
    """A request on the engine: its fork of the stored context, the logits of its next token,
    the tokens drawn so far and their text."""

    job: Job
    entry: Entry
    sequence: Sequence
    sampler: TokenSampler
    text: TextStream
    logits: Tensor
    max_tokens: int
    prompt_tokens: int
    cached_tokens: int
    reserved: int
    """Bytes held for it while it runs: an uncompressed cache of its prompt and ``max_tokens``."""
    tokens: list[int] = field(default_factory=list)


class NoRoom(Exception):
    """A request's cache does not fit the cap beside the running requests' yet: it waits."""


class Worker:
    """The engine's one thread, its queue (``max_queue`` waiting requests at most) and the
    requests it is decoding (``max_batch`` at most, :attr:`running`)."""

    def __init__(
        self, engine: Engine, store: ContextStore, metrics: Metrics, max_queue: int, max_batch: int = 16,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r}: must be an integer >= 1")
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.running: list[Active] = []
        """The requests on the engine (prefilled, decoding); only the engine thread changes it."""
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._mean_latency = 1.0
        self.loaded: list[tuple[str, str]] = []  # (text, recipe) of contexts loaded from files
        self.documents = DocumentServer(
            engine, metrics, store.max_bytes, self.check_memory, beside=lambda: store.held_bytes,
        )
        store.beside = lambda: self.documents.cache.held_bytes  # one cap for both
        """Requests that name documents (``kvlab.documents``, APE): :mod:`kvlab.server.documents`."""
        self._thread = threading.Thread(target=self._run, name="kvlab-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what is queued or running and stop the thread."""
        with self._wake:
            self._closed = True
            for job in [*self._queue, *(a.job for a in list(self.running))]:
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
        """Seconds a refused client should wait: the mean latency times the batches ahead."""
        return max(1, math.ceil(self._mean_latency * math.ceil((len(self._queue) + 1) / self.max_batch)))

    # -- the scheduler ----------------------------------------------------------------------
    def _run(self) -> None:
        """nano-vllm's loop: admit waiting requests while the batch has room (each prefilled
        on arrival), then one decoding step of every running request; until closed."""
        while True:
            with self._wake:
                while not self._queue and not self.running and not self._closed:
                    self._wake.wait()
                if self._closed:
                    break
                admitted: list[Job] = []
                while self._queue and len(self.running) + len(admitted) < self.max_batch:
                    job = self._queue.popleft()
                    if not job.cancelled.is_set():
                        admitted.append(job)
                self.metrics.queue_length.set(len(self._queue))
            for i, job in enumerate(admitted):
                if not self.admit(job):  # no room beside the running ones: wait at the head
                    with self._wake:
                        self._queue.extendleft(reversed(admitted[i:]))
                        self.metrics.queue_length.set(len(self._queue))
                    break
            if self.running:
                self.step()
        for active in list(self.running):  # closed: what was running was cancelled
            self._end(active, cancelled=True)

    def admit(self, job: Job) -> bool:
        """Prefill ``job``'s prompt (on a fork of its stored context) and add it to
        :attr:`running`; an error is posted to the job. False when its cache does not fit the
        cap beside the running requests' (:meth:`room_for`): it was not started."""
        if job.request.documents:  # APE: served whole, one by one (below)
            self._serve_documents(job)
            return True
        self.metrics.running.inc()
        try:
            self.running.append(self._prefill(job, job.request))
        except NoRoom:
            self.metrics.running.dec()
            return False
        except Exception as exc:
            self.metrics.running.dec()
            self._post_error(job, exc)
            self._update_store_metrics()
        return True

    def _serve_documents(self, job: Job) -> None:
        """Serve a request that names documents (``kvlab.documents``, APE) from prefill to its
        last token before the next step of the batch: its joined cache is not a fork of one
        stored context, so it is not batched (:mod:`kvlab.server.documents`)."""
        self.metrics.running.inc()
        try:
            outcome = self.documents.generate(job, job.request)
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
        except Exception as exc:
            self._post_error(job, exc)
        finally:
            self.metrics.running.dec()
            self._update_store_metrics()

    def room_for(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the cache cap beside the stored contexts and the bytes
        reserved by the running requests, once unpinned stored contexts are evicted as needed
        (as nano-vllm's block manager answers ``can_allocate``). With nothing running, a
        request that fits the cap alone (:meth:`check_memory`) always has room."""
        running = sum(a.reserved for a in self.running)
        self._evict(running + nbytes)
        held = self.store.held_bytes + self.documents.cache.held_bytes
        return not self.running or held + running + nbytes <= self.store.max_bytes

    def step(self) -> None:
        """One token for every running request: each draws from its logits (and ends on a stop
        token, a stop sequence, ``max_tokens`` or its client leaving), then the ones going on
        run that token through the model: together in one forward where their recipes batch
        their decoding (:meth:`Engine.decode_step`), else each in a forward of its own."""
        going: list[Active] = []
        for active in list(self.running):
            job = active.job
            if job.cancelled.is_set():
                self._end(active, cancelled=True)
                continue
            token = active.sampler(active.logits)
            if not active.tokens:
                self.metrics.ttft.observe(time.perf_counter() - job.arrived)
            active.tokens.append(token)
            piece = active.text.feed(token)
            if piece:
                job.post("delta", piece)
            if token in self.engine.stop_ids or active.text.stopped or len(active.tokens) >= active.max_tokens:
                self._end(active)
            else:
                going.append(active)
        together = [a for a in going if a.sequence.recipe.batches_decode]
        groups = ([together] if together else []) + [[a] for a in going if not a.sequence.recipe.batches_decode]
        for group in groups:
            try:
                logits = self.engine.decode_step([a.sequence for a in group], [a.tokens[-1] for a in group])
            except Exception as exc:
                for active in group:
                    self._end(active, error=exc)
                continue
            for active, row in zip(group, logits):
                active.logits = row

    def _end(self, active: Active, cancelled: bool = False, error: Exception | None = None) -> None:
        """Take ``active`` off the engine: post its outcome (or that it was cancelled, or its
        error) and free what it held (its fork; its pin on the stored context)."""
        job = active.job
        self.running.remove(active)
        try:
            if error is not None:
                self._post_error(job, error)
            elif cancelled or job.cancelled.is_set():
                job.post("cancelled")
            else:
                latency = time.perf_counter() - job.arrived
                self._mean_latency = 0.8 * self._mean_latency + 0.2 * latency
                stopped = active.text.stopped or active.tokens[-1] in self.engine.stop_ids
                outcome = Outcome(
                    rest=active.text.rest(), finish_reason="stop" if stopped else "length",
                    prompt_tokens=active.prompt_tokens, completion_tokens=len(active.tokens),
                    cached_tokens=active.cached_tokens, kv_bytes=active.sequence.nbytes(),
                )
                self.metrics.latency.observe(latency)
                self.metrics.prompt_tokens.inc(outcome.prompt_tokens)
                self.metrics.cached_tokens.inc(outcome.cached_tokens)
                self.metrics.completion_tokens.inc(outcome.completion_tokens)
                job.post("done", outcome)
        finally:
            self.engine.counters.decoded_tokens += len(active.tokens)
            self.store.release(active.entry)
            self.metrics.running.dec()
            self._update_store_metrics()

    def _post_error(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, ApiError):
            job.post("error", exc)
        elif isinstance(exc, KvlabError):
            job.post("error", ApiError(400, str(exc), code="invalid_request"))
        else:  # a bug: answer 500, keep serving
            log.error("request %s failed", job.request.id, exc_info=exc)
            job.post("error", ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    def _update_store_metrics(self) -> None:
        self.metrics.kv_bytes_held.set(self.store.held_bytes + self.documents.cache.held_bytes)
        self.metrics.cached_contexts.set(len(self.store))

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
        self._update_store_metrics()
        return entry

    # -- one request's prompt ------------------------------------------------------------------
    def _prefill(self, job: Job, request: GenerationRequest) -> Active:
        """Find or encode the request's context, then prefill the rest of its prompt on a fork
        of it (the stored context stays as it was, for the requests beside and after)."""
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
        reserved = self.full_bytes(len(ids) + max_tokens)
        if not self.room_for(reserved + (0 if entry is not None else self.full_bytes(context_tokens))):
            if entry is not None:
                self.store.release(entry)
            raise NoRoom
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
        try:
            sequence = entry.sequence.fork()
            rest = ids[len(entry.tokens):]
            logits = engine.prefill(sequence, rest, compress=False, progress=False) if rest else entry.logits
            return Active(
                job=job, entry=entry, sequence=sequence, sampler=request.sampling.sampler(engine.device),
                text=TextStream(engine.tokenizer, request.stop), logits=logits, max_tokens=max_tokens,
                prompt_tokens=len(ids), cached_tokens=cached, reserved=reserved,
            )
        except BaseException:
            self.store.release(entry)
            raise

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


__all__ = ["CHAT_MAX_TOKENS", "COMPLETION_MAX_TOKENS", "Active", "Job", "NoRoom", "Outcome", "Worker"]
