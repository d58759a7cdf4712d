"""APE on the server: a chat request's documents encoded once each, joined for its question.

A chat request whose recipe has a reuse method (``"kvlab": {"recipe": "ape", "documents":
[...]}``) names its documents: each item is a document's text, or ``{"id": KEY}`` for a
document a request of the same tenant already sent (its key is returned in
``usage.documents``). The prompt is the chat's messages with the documents, in the order
given, at the start of the last user message's content, then ``"\\n\\n"`` and that content:
what ``full`` would encode as one sequence. With APE:

- the **prefix** (everything rendered before the last user message's content: the chat
  template's start, a system prompt, earlier turns) is encoded once and cached, keyed by its
  token ids;
- each **document** is encoded once after that prefix and cached, keyed by the SHA-256 of the
  prefix's and the document's token ids (:func:`kvlab.reuse.documents.document_key`): the same
  text after another prefix is another document;
- every key lives in the namespace ``(tenant, model, recipe)``: a tenant never matches
  another's documents, by text or by id;
- a request prefills only what is not cached, then its question (joined cache:
  :func:`kvlab.reuse.documents.join`); ``usage.prompt_tokens_details.cached_tokens`` counts
  the prefix's and the documents' tokens that came from the cache.

Cached prefixes and documents are held in an LRU bounded by the server's cache cap
(``--max-cache-gib``, measured bytes of their keys and values), shared with the context store:
the two together hold at most the cap, each evicting its own least recently used entries; an
entry evicted while a request uses it stays alive until that request ends.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvlab.engine.engine import Engine
from kvlab.engine.prompt import QUESTION_SEPARATOR
from kvlab.engine.sequence import Sequence
from kvlab.reuse.documents import document_key, encode_document, encode_prefix, join
from kvlab.server.metrics import Metrics
from kvlab.server.protocol import ApiError, GenerationRequest, Outcome, TextStream

_SPLIT = "\u2063KVLAB_DOCUMENTS\u2063"
CHAT_MAX_TOKENS = 512
"""Default ``max_tokens`` (the worker's, for every chat request)."""


@dataclass(frozen=True)
class DocumentsOutcome(Outcome):
    """What a documents request reports: a request's :class:`Outcome`, and each document's
    key, tokens and whether it came from the cache (``usage.documents``)."""

    documents: tuple[dict[str, Any], ...] = ()

    def usage(self) -> dict[str, Any]:
        return {**super().usage(), "documents": list(self.documents)}


class DocumentCache:
    """Prefix caches and documents' caches by key, least recently used first out."""

    def __init__(self, max_bytes: int, beside: Callable[[], int] = lambda: 0) -> None:
        self.max_bytes = max_bytes
        self.beside = beside
        """Bytes held under the same cap outside this cache (the server's context store)."""
        self.held_bytes = 0
        self._items: OrderedDict[tuple[Any, ...], tuple[Any, int]] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: tuple[Any, ...], value: Any, nbytes: int) -> None:
        if self.beside() + nbytes > self.max_bytes:  # cannot fit even alone: keep what is held
            return
        while self._items and self.held_bytes + self.beside() + nbytes > self.max_bytes:
            _, (_, freed) = self._items.popitem(last=False)
            self.held_bytes -= freed
        if self.held_bytes + self.beside() + nbytes <= self.max_bytes:
            self._items[key] = (value, nbytes)
            self.held_bytes += nbytes

    def __len__(self) -> int:
        return len(self._items)


class DocumentServer:
    """Serves the chat requests that name documents (see the module docstring)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_bytes: int,
                 check_memory: Callable[[int], None], beside: Callable[[], int] = lambda: 0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.cache = DocumentCache(max_bytes, beside)
        self.check_memory = check_memory

    def generate(self, job: Any, request: GenerationRequest) -> DocumentsOutcome:
        engine, fmt = self.engine, self.engine.prompt_format
        if request.kind != "chat":
            raise ApiError(400, "kvlab.documents is served for chat requests (/v1/chat/completions)",
                           param="kvlab.documents", code="invalid_value")
        if request.recipe.reuse is None:
            raise ApiError(400, f"kvlab.documents needs a recipe with a reuse method (e.g. 'ape'); the "
                           f"recipe is '{request.recipe}'", param="kvlab.recipe", code="invalid_recipe")
        namespace = (job.tenant, engine.name, str(request.recipe))
        messages = list(request.messages)
        last = {"role": "user", "content": _SPLIT + QUESTION_SEPARATOR + messages[-1]["content"]}
        head, tail = fmt.render([*messages[:-1], last]).split(_SPLIT, 1)
        prefix_ids = fmt.encode(head, first=True)
        question = fmt.encode(tail, first=False)
        named = {}  # documents named by id: all found before anything is encoded
        for i, item in enumerate(request.documents):
            if isinstance(item, dict):
                doc = self.cache.get((*namespace, "document", item["id"]))
                if doc is None or doc.prefix_tokens != len(prefix_ids):
                    raise ApiError(400, f"kvlab.documents[{i}].id={item['id']!r}: no such document encoded "
                                   "after this prompt's prefix for this tenant and recipe (send its text)",
                                   param=f"kvlab.documents[{i}]", code="unknown_document")
                named[i] = doc
        cached = 0
        prefix = self.cache.get((*namespace, "prefix", tuple(prefix_ids)))
        if prefix is None:
            prefix = encode_prefix(engine, request.recipe, prefix_ids)
            self.cache.put((*namespace, "prefix", tuple(prefix_ids)), prefix, prefix.nbytes())
        else:
            cached += len(prefix_ids)
        chosen, reports = [], []
        for i, item in enumerate(request.documents):
            if isinstance(item, dict):
                key, doc, hit = item["id"], named[i], True
            else:
                ids = fmt.encode(item, first=False)
                key = document_key(prefix_ids, ids)
                doc = self.cache.get((*namespace, "document", key))
                hit = doc is not None
                if doc is None:
                    doc = encode_document(engine, prefix, ids)
                    self.cache.put((*namespace, "document", key), doc, doc.nbytes())
            cached += len(doc) if hit else 0
            chosen.append(doc)
            reports.append({"id": key, "tokens": len(doc), "cached": hit})
        prompt_tokens = len(prefix_ids) + sum(len(d) for d in chosen) + len(question)
        window = engine.context_window(request.recipe)
        max_tokens = request.max_tokens or max(1, min(CHAT_MAX_TOKENS, window - prompt_tokens))
        positions = len(prefix_ids) + max(len(d) for d in chosen) + len(question)
        engine.check_fits(request.recipe, positions, max_tokens, allow_overflow=False)
        self.check_memory(prompt_tokens + max_tokens)
        sequence = join(engine, prefix, chosen)
        decoded, text = self._answer(job, sequence, question, max_tokens, request)
        stopped = text.stopped or (decoded.tokens and decoded.tokens[-1] in engine.stop_ids)
        return DocumentsOutcome(
            rest=text.rest(), finish_reason="stop" if stopped else "length", prompt_tokens=prompt_tokens,
            completion_tokens=len(decoded.tokens), cached_tokens=cached, kv_bytes=sequence.nbytes(),
            documents=tuple(reports),
        )

    def _answer(self, job: Any, sequence: Sequence, question: list[int], max_tokens: int,
                request: GenerationRequest) -> tuple[Any, TextStream]:
        engine = self.engine
        text = TextStream(engine.tokenizer, request.stop)
        first: list[float] = []

        def on_token(token: int) -> bool:
            if job.cancelled.is_set():
                return False
            if not first:
                first.append(time.perf_counter())
                self.metrics.ttft.observe(first[0] - job.arrived)
            piece = text.feed(token)
            if piece:
                job.post("delta", piece)
            return not text.stopped

        logits = engine.prefill(sequence, question, compress=False, progress=False)
        decoded = engine.decode(sequence, logits, max_tokens, request.sampling.sampler(engine.device), on_token=on_token)
        return decoded, text


__all__ = ["DocumentCache", "DocumentServer", "DocumentsOutcome"]
