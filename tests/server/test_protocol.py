"""Request checks, text streaming with stop sequences, API key files."""

from __future__ import annotations

import pytest

import kvlab
from kvlab.server.auth import ANONYMOUS, load_api_keys, tenant_of
from kvlab.server.protocol import ApiError, TextStream, parse_request

FULL = kvlab.parse_recipe("full")


def test_a_request_is_parsed_with_its_own_recipe():
    request = parse_request("chat", {
        "model": "m", "messages": [{"role": "system", "content": "doc"}, {"role": "user", "content": "q?"}],
        "max_tokens": 3, "temperature": 0, "seed": 1, "stop": "\n", "kvlab": {"recipe": "snapkv(budget=0.5)"},
    }, FULL)
    assert str(request.recipe).startswith("snapkv(budget=0.5") and request.stop == ("\n",)
    assert request.sampling.temperature == 0 and request.max_tokens == 3


@pytest.mark.parametrize("body, words", [
    ({"model": "m", "prompt": "x", "best_of": 2}, ["'best_of'", "prompt, model"]),
    ({"model": "m", "prompt": ""}, ["prompt=''"]),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, ["max_tokens=0", ">= 1"]),
    ({"model": "m", "prompt": "x", "top_p": 0}, ["top_p=0", "(0, 1]"]),
    ({"model": "m", "prompt": "x", "stop": ["a"] * 5}, ["stop=", "at most 4"]),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, ["stream=true"]),
    ({"prompt": "x"}, ["model=None"]),
])
def test_bad_completion_fields(body, words):
    with pytest.raises(ApiError) as error:
        parse_request("completion", body, FULL)
    assert error.value.status == 400 and all(w in error.value.message for w in words), error.value.message


def test_bad_messages():
    with pytest.raises(ApiError, match=r"messages\[0\].role='robot': must be one of system, user, assistant"):
        parse_request("chat", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, FULL)
    with pytest.raises(ApiError, match="last message's role is 'assistant'"):
        parse_request("chat", {"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, FULL)


class CharTokenizer:
    """One token per character (token id = code point)."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(t) for t in tokens)


def feed(text, stop):
    stream = TextStream(CharTokenizer(), stop)
    pieces = []
    for ch in text:
        pieces.append(stream.feed(ord(ch)))
        if stream.stopped:
            break
    return pieces, stream


def test_text_stops_before_the_stop_sequence_and_never_sends_its_start():
    pieces, stream = feed("hello END world", ("END",))
    assert stream.stopped and "".join(pieces) + stream.rest() == "hello "
    pieces, stream = feed("an EN dash", ("END",))  # "EN" was held back, then released
    assert not stream.stopped and "".join(pieces) + stream.rest() == "an EN dash"
    assert "".join(pieces[:4]) == "an "  # the "E" that may start "END" waits


def test_api_key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# keys\nsk-a alice\n\nsk-b   # no tenant name\n")
    keys = load_api_keys(path)
    assert keys == {"sk-a": "alice", "sk-b": "key4"}
    assert tenant_of(keys, "Bearer sk-a") == "alice" and tenant_of(keys, "Bearer sk-c") is None
    assert tenant_of(keys, None) is None and tenant_of(None, None) == ANONYMOUS
    path.write_text("sk-a alice extra\n")
    with pytest.raises(kvlab.InputError, match="line 1: expected 'KEY' or 'KEY TENANT'"):
        load_api_keys(path)
    path.write_text("\n# nothing\n")
    with pytest.raises(kvlab.InputError, match="holds no key"):
        load_api_keys(path)
