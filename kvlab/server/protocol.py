"""The OpenAI request and response shapes the server speaks, checked field by field.

A request body is checked before it is queued: a field the server does not serve, a value of
the wrong type or out of range, or a bad recipe is an :class:`ApiError` (HTTP 400, OpenAI's
error shape) whose message names the field, the bad value and what is allowed. kvlab's own
options travel in the body's ``"kvlab"`` object (the ``openai`` client's ``extra_body``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvlab.engine.sampling import Sampling
from kvlab.errors import KvlabError
from kvlab.recipe import Recipe, parse_recipe

COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                 "stream_options", "n", "kvlab")
CHAT_FIELDS = ("messages", *COMMON_FIELDS)
COMPLETION_FIELDS = ("prompt", *COMMON_FIELDS)
KVLAB_FIELDS = ("recipe", "documents")
MAX_DOCUMENTS = 256  # documents one request may name (kvlab.documents)
ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # OpenAI's limit on stop sequences


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape: ``{"error": {"message", "type", "param",
    "code"}}``; ``headers`` are added to the response (``Retry-After``)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 503: "server_overloaded"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request. ``messages`` (chat) or ``prompt`` (completion) is the input; it is
    tokenized on the engine's thread (see :mod:`kvlab.server.worker`)."""

    kind: str  # "chat" or "completion"
    model: str
    recipe: Recipe
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    messages: tuple[dict[str, str], ...] = ()
    prompt: str = ""
    documents: tuple[str | dict[str, str], ...] = ()
    """``kvlab.documents``: texts, or ``{"id": key}`` of documents encoded before (APE:
    :mod:`kvlab.server.documents`)."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def parse_request(kind: str, body: Any, default_recipe: Recipe) -> GenerationRequest:
    """Check an OpenAI ``/v1/chat/completions`` (``kind="chat"``) or ``/v1/completions``
    (``kind="completion"``) body; an :class:`ApiError` names the first bad field."""
    if not isinstance(body, dict):
        raise bad("body", f"the request body must be a JSON object, got {type(body).__name__}")
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise bad(unknown[0], f"unsupported field {unknown[0]!r} (value {_short(body[unknown[0]])}); "
                  f"this server takes: {', '.join(allowed)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", f"model={_short(model)}: a model name is required (see GET /v1/models)")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise bad("n", f"n={_short(n)}: only n=1 is served (one choice per request)")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", f"stream={_short(stream)}: must be true or false")
    include_usage = _stream_options(body.get("stream_options"), stream)
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise bad("max_tokens", f"max_tokens={_short(max_tokens)}: must be an integer >= 1")
    temperature = _number(body, "temperature", 1.0)  # OpenAI's default
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise bad("temperature", f"temperature={temperature}: must be in [0, 2] (0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        raise bad("top_p", f"top_p={top_p}: must be in (0, 1]")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"seed={_short(seed)}: must be an integer")
    recipe = _recipe(body.get("kvlab"), default_recipe)
    common = dict(
        kind=kind, model=model, recipe=recipe, max_tokens=max_tokens,
        sampling=Sampling(temperature, top_p, seed), stop=_stop(body.get("stop")), stream=stream,
        include_usage=include_usage, documents=_documents(body.get("kvlab")),
    )
    if kind == "chat":
        return GenerationRequest(messages=_messages(body.get("messages")), **common)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt", f"prompt={_short(prompt)}: must be one non-empty string")
    return GenerationRequest(prompt=prompt, **common)


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"{name}={_short(value)}: must be a number")
    return float(value)


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream=true")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise bad("stream_options", f"stream_options={_short(value)}: the only option is include_usage")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("stream_options", f"stream_options.include_usage={_short(include)}: must be true or false")
    return include


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise bad("stop", f"stop={_short(value)}: must be a non-empty string or a list of at most {MAX_STOP}")
    return tuple(stops)


def _recipe(value: Any, default: Recipe) -> Recipe:
    if value is None:
        return default
    if not isinstance(value, dict) or set(value) - set(KVLAB_FIELDS):
        raise bad("kvlab", f"kvlab={_short(value)}: must be an object with the keys: {', '.join(KVLAB_FIELDS)}")
    recipe = value.get("recipe")
    if recipe is None:
        return default
    if not isinstance(recipe, str):
        raise bad("kvlab.recipe", f"kvlab.recipe={_short(recipe)}: must be a recipe string, e.g. 'snapkv(budget=0.25)'")
    try:
        return parse_recipe(recipe)
    except KvlabError as exc:
        raise ApiError(400, str(exc), param="kvlab.recipe", code="invalid_recipe") from None


def _documents(value: Any) -> tuple[str | dict[str, str], ...]:
    documents = value.get("documents") if isinstance(value, dict) else None
    if documents is None:
        return ()
    if not isinstance(documents, list) or not documents or len(documents) > MAX_DOCUMENTS:
        raise bad("kvlab.documents", f"kvlab.documents={_short(documents)}: must be a list of 1 to "
                  f"{MAX_DOCUMENTS} documents (texts, or {{'id': KEY}} of documents sent before)")
    for i, doc in enumerate(documents):
        text_ok = isinstance(doc, str) and doc.strip()
        id_ok = isinstance(doc, dict) and set(doc) == {"id"} and isinstance(doc["id"], str)
        if not (text_ok or id_ok):
            raise bad(f"kvlab.documents[{i}]", f"kvlab.documents[{i}]={_short(doc)}: must be a non-empty "
                      "text or {'id': KEY} (a key from an earlier response's usage.documents)")
    return tuple(documents)


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise bad("messages", f"messages={_short(value)}: must be a non-empty list of {{role, content}}")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            raise bad(where, f"{where}={_short(message)}: must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role={_short(role)}: must be one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is served
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"{where}.content", f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are served")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"{where}.content={_short(content)}: must be a string")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise bad("messages", f"the last message's role is {messages[-1]['role']!r}: it must be 'user'")
    if not messages[-1]["content"].strip():
        raise bad("messages", "the last user message is empty")
    return tuple(messages)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TextStream:
    """The text of the tokens generated so far, released in pieces that are safe to send: a
    piece never ends inside a stop sequence's possible start nor inside an incomplete UTF-8
    character; the text ends before the first stop sequence (which is not returned)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, token: int) -> str:
        """Add ``token``; returns the new text safe to send now (maybe empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            text = text[: min(cuts)]
            self.stopped = True
            safe = len(text)
        else:
            safe = len(text.rstrip("\ufffd"))
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        self.text = text
        piece = text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return piece

    def rest(self) -> str:
        """The text not sent yet (at the end of the generation)."""
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece



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


__all__ = ["ApiError", "GenerationRequest", "Outcome", "TextStream", "parse_request"]
