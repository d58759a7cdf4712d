"""APE on the server: a chat request's documents (``kvlab.documents``) are encoded once each and
joined for its question; a later request naming them (by text or by id) prefills only its
question. Real server, ``openai`` client (``extra_body``) and raw HTTP."""

from __future__ import annotations

import pytest

DOCS = [
    "Passage 1: The lighthouse keeper on Gull Island paints the door green every spring. ",
    "Passage 2: The code of the red door is 4417, and only Alice knows it. ",
    "Passage 3: Trains to the harbour leave every twenty minutes from platform six. ",
]
EXACT = "ape(temperature=1.0, scale=1.0)"
GREEDY = dict(temperature=0, max_tokens=6)


def ask(client, model, question, documents, recipe="ape"):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}],
        extra_body={"kvlab": {"recipe": recipe, "documents": documents}}, **GREEDY,
    )


def test_one_document_at_t_1_s_1_answers_as_the_python_api_and_as_full(serve):
    server = serve()
    engine = server.engine
    out = ask(server.client(), engine.name, "What is the code?", [DOCS[1]], EXACT)
    docs = engine.documents(EXACT)
    key = docs.add(DOCS[1])
    assert out.choices[0].message.content == docs.ask("What is the code?", max_new_tokens=6).text
    ids = docs.sequential_ids("What is the code?", [key])
    assert out.choices[0].message.content == engine.generate_ids(ids, "full", max_new_tokens=6).text
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.model_extra["documents"] == [{"id": key, "tokens": len(docs.cache[key]), "cached": False}]


def test_cached_documents_in_any_order_prefill_only_the_question(serve):
    server = serve()
    client, model = server.client(), server.engine.name
    first = ask(client, model, "What is the code of the red door?", DOCS)
    reports = first.usage.model_extra["documents"]
    assert first.usage.prompt_tokens_details.cached_tokens == 0 and not any(r["cached"] for r in reports)
    prefilled = server.engine.counters.prefilled_tokens
    again = ask(client, model, "What is the code of the red door?", [DOCS[2], {"id": reports[0]["id"]}, DOCS[1]])
    reports2 = again.usage.model_extra["documents"]
    assert all(r["cached"] for r in reports2)
    question = again.usage.prompt_tokens - sum(r["tokens"] for r in reports2) - (
        first.usage.prompt_tokens - sum(r["tokens"] for r in reports))  # the prefix cancels out
    assert question == 0  # the same question: the same prompt length
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - (
        server.engine.counters.prefilled_tokens - prefilled)  # only the question was prefilled
    assert again.choices[0].message.content == first.choices[0].message.content  # order does not matter


def test_another_tenant_cannot_name_a_document_and_bad_documents_are_400(serve):
    server = serve(api_keys={"key-a": "a", "key-b": "b"})
    model = server.engine.name
    first = ask(server.client("key-a"), model, "Code?", [DOCS[0]])
    key = first.usage.model_extra["documents"][0]["id"]
    with server.http() as http:
        body = {"model": model, "messages": [{"role": "user", "content": "Code?"}], "max_tokens": 2,
                "kvlab": {"recipe": "ape", "documents": [{"id": key}]}}
        refused = http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer key-b"})
        assert refused.status_code == 400 and key in refused.json()["error"]["message"]
        other = ask(server.client("key-b"), model, "Code?", [DOCS[0]])
        assert other.usage.prompt_tokens_details.cached_tokens == 0  # b encodes its own prefix and document
        [report] = other.usage.model_extra["documents"]
        assert report["id"] == key and report["cached"] is False  # same text, same key; b's own cache
        for documents, words in [([], "kvlab.documents=[]"), ([3], "kvlab.documents[0]=3"),
                                 ([{"key": "x"}], "kvlab.documents[0]")]:
            body["kvlab"]["documents"] = documents
            answer = http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer key-a"})
            assert answer.status_code == 400 and words in answer.json()["error"]["message"], answer.text
        body["kvlab"] = {"recipe": "snapkv(budget=0.5)", "documents": [DOCS[0]]}
        answer = http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer key-a"})
        assert answer.status_code == 400 and "reuse method" in answer.json()["error"]["message"]


@pytest.mark.parametrize("stream", [True])
def test_streaming_documents_request(serve, stream):
    server = serve()
    whole = ask(server.client(), server.engine.name, "Which platform?", DOCS)
    chunks = server.client().chat.completions.create(
        model=server.engine.name, messages=[{"role": "user", "content": "Which platform?"}], stream=stream,
        extra_body={"kvlab": {"recipe": "ape", "documents": DOCS}}, **GREEDY,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
