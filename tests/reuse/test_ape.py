"""APE (Yang et al., ICLR 2025): documents encoded apart after a shared prefix, joined in any
order, the question attending with temperature T and scaling factor S.

The reference is the tiny model written out layer by layer (``tests/compress/reference.py``)
with APE's attention written out pair by pair from the paper's formula, on the whole prompt
(prefix, documents, question) as one token sequence: each document's tokens attend to the
prefix and to themselves at positions ``|P| ..``; each question token at ``|P| + max L + j``
gives a document key ``j`` the weight ``exp(x_j / T) Z_C^(S T - 1) / (Z_C^(S T) + Z_O)`` and a
prefix or question key ``exp(x_j) / (Z_C^(S T) + Z_O)``.
"""

from __future__ import annotations

import math

import pytest
import torch

import kvlab
from kvlab.recipe import parse_recipe
from kvlab.reuse.base import DOCUMENTS
from kvlab.reuse.documents import encode_document, encode_prefix, join
from tests.compress.reference import causal_softmax_attention, reference_logits
from tests.conftest import assert_recipe_refused, prompt_ids, tiny_engine

LISTED = "ape(temperature=0.5, scale=0.7)"
PREFIX, LENGTHS, QUESTION, FOLLOW = 6, (9, 14, 5), 4, 3


def parts(seed: int = 3) -> tuple[list[int], list[list[int]], list[int]]:
    ids = prompt_ids(PREFIX + sum(LENGTHS) + QUESTION + FOLLOW, seed=seed)
    prefix, rest = ids[:PREFIX], ids[PREFIX:]
    docs = []
    for n in LENGTHS:
        docs.append(rest[:n])
        rest = rest[n:]
    return prefix, docs, rest


def layout(prefix: int, lengths: tuple[int, ...], tail: int) -> tuple[torch.Tensor, list[int]]:
    """Each token's position and segment (-1 prefix, i document i, -2 question) in the
    sequential token order prefix, documents, question (and tokens after it)."""
    positions = list(range(prefix))
    segment = [-1] * prefix
    for i, n in enumerate(lengths):
        positions += range(prefix, prefix + n)
        segment += [i] * n
    start = prefix + max(lengths)
    positions += range(start, start + tail)
    segment += [-2] * tail
    return torch.tensor(positions), segment


def ape_attention(lengths: tuple[int, ...], temperature: float, scale: float):
    """The paper's attention over the whole sequence, written out (see the module docstring)."""

    def attention(layer, q, k, v, rope):
        n = q.shape[1]
        positions, segment = layout(PREFIX, lengths, n - PREFIX - sum(lengths))
        qr, kr = rope(q, positions), rope(k, positions)
        group = q.shape[0] // k.shape[0]
        kr, vv = kr.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        x = qr @ kr.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [Hq, n, n]
        out = torch.zeros_like(q)
        for i in range(n):
            if segment[i] != -2:  # the prefix and the documents: causal over prefix + own segment
                keys = [j for j in range(i + 1) if segment[j] in (-1, segment[i])]
                w = torch.softmax(x[:, i, keys], dim=-1)
                out[:, i] = torch.einsum("hm,hmd->hd", w, vv[:, keys])
                continue
            docs = [j for j in range(n) if segment[j] >= 0]
            other = [j for j in range(i + 1) if segment[j] < 0]  # prefix, question up to i
            z_c = torch.exp(x[:, i, docs] / temperature).sum(-1, keepdim=True)  # [Hq, 1]
            z_o = torch.exp(x[:, i, other]).sum(-1, keepdim=True)
            denominator = z_c ** (scale * temperature) + z_o
            w_docs = torch.exp(x[:, i, docs] / temperature) * z_c ** (scale * temperature - 1) / denominator
            w_other = torch.exp(x[:, i, other]) / denominator
            out[:, i] = (torch.einsum("hm,hmd->hd", w_docs, vv[:, docs])
                         + torch.einsum("hm,hmd->hd", w_other, vv[:, other]))
        return out

    return attention


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def joined(engine, recipe, prefix, docs, order=None):
    base = encode_prefix(engine, parse_recipe(recipe), prefix)
    encoded = [encode_document(engine, base, d) for d in docs]
    chosen = encoded if order is None else [encoded[i] for i in order]
    return base, encoded, join(engine, base, chosen)


def answer_logprobs(engine, sequence, question, follow):
    logits = engine.prefill(sequence, question, compress=False)
    return engine.teacher_force(sequence, logits, follow + [0])


def test_each_parallel_encoded_document_is_that_document_encoded_alone_after_the_prefix(engine):
    prefix, docs, _ = parts()
    base, encoded, sequence = joined(engine, "ape", prefix, docs)
    start = 0
    for doc, ids in zip(encoded, docs):
        alone = engine.new_sequence("full")
        engine.prefill(alone, prefix + ids, compress=True)
        for i, layer in enumerate(alone.layers):
            torch.testing.assert_close(doc.keys[i], layer.keys[:, :, PREFIX:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(doc.values[i], layer.values[:, :, PREFIX:], atol=1e-5, rtol=1e-5)
            joined_layer = sequence.layers[i]
            span = slice(PREFIX + start, PREFIX + start + len(ids))
            torch.testing.assert_close(joined_layer.keys[:, :, span], layer.keys[:, :, PREFIX:], atol=1e-5, rtol=1e-5)
            assert joined_layer.key_positions()[span].tolist() == list(range(PREFIX, PREFIX + len(ids)))
        start += len(ids)
    assert base.seen == PREFIX and base.layers[0].num_entries == PREFIX  # the prefix is left as it was
    assert sequence.seen == PREFIX + max(LENGTHS)  # the question comes after the longest document
    span = sequence.layers[0].side[DOCUMENTS]
    assert (span.start, span.end) == (PREFIX, PREFIX + sum(LENGTHS))


@pytest.mark.parametrize("temperature, scale", [(0.5, 0.7), (0.9, 0.9), (1.0, 0.6)])
def test_the_questions_attention_is_the_papers_formula_pair_by_pair(engine, temperature, scale):
    prefix, docs, rest = parts()
    question, follow = rest[:QUESTION], rest[QUESTION:]
    _, _, sequence = joined(engine, f"ape(temperature={temperature}, scale={scale})", prefix, docs)
    got = answer_logprobs(engine, sequence, question, follow)
    ids = prefix + sum(docs, []) + question + follow
    reference = torch.log_softmax(reference_logits(ids, ape_attention(LENGTHS, temperature, scale)), dim=-1)
    torch.testing.assert_close(got, reference[-len(follow) - 1 :], atol=1e-4, rtol=1e-4)


def test_with_t_1_s_1_and_one_document_it_is_full(engine):
    prefix, docs, rest = parts(seed=5)
    question, follow = rest[:QUESTION], rest[QUESTION:]
    _, _, sequence = joined(engine, "ape(temperature=1.0, scale=1.0)", prefix, docs[1:2])
    got = answer_logprobs(engine, sequence, question, follow)
    full = engine.new_sequence("full")
    logits = engine.prefill(full, prefix + docs[1] + question, compress=True)
    want = engine.teacher_force(full, logits, follow + [0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # at the defaults (T = S = 0.9) the same single document is attended differently
    _, _, sequence = joined(engine, "ape", prefix, docs[1:2])
    assert not torch.allclose(answer_logprobs(engine, sequence, question, follow), want, atol=1e-4)


def test_with_t_1_s_1_several_documents_it_is_causal_attention_over_the_joined_cache(engine):
    """T = S = 1 merges the parts exactly: plain parallel encoding (PCW's attention)."""
    prefix, docs, rest = parts()
    question, follow = rest[:QUESTION], rest[QUESTION:]
    _, _, sequence = joined(engine, "ape(temperature=1.0, scale=1.0)", prefix, docs)
    got = answer_logprobs(engine, sequence, question, follow)

    def plain(layer, q, k, v, rope):
        n = q.shape[1]
        positions, segment = layout(PREFIX, LENGTHS, n - PREFIX - sum(LENGTHS))
        allowed = torch.tensor([[j <= i and (segment[i] == -2 or segment[j] in (-1, segment[i]))
                                 for j in range(n)] for i in range(n)])
        return causal_softmax_attention(rope(q, positions), rope(k, positions), v, allowed)

    ids = prefix + sum(docs, []) + question + follow
    reference = torch.log_softmax(reference_logits(ids, plain), dim=-1)
    torch.testing.assert_close(got, reference[-len(follow) - 1 :], atol=1e-4, rtol=1e-4)


def test_any_order_of_the_documents_holds_the_same_entries_and_gives_the_same_answer(engine):
    prefix, docs, rest = parts()
    question, follow = rest[:QUESTION], rest[QUESTION:]
    _, encoded, forward = joined(engine, "ape", prefix, docs)
    base, _, backward = joined(engine, "ape", prefix, docs, order=[2, 0, 1])
    for a, b in zip(forward.layers, backward.layers):
        def entries(layer):
            rows = torch.cat([layer.keys[0], layer.values[0]], dim=-1).transpose(0, 1)  # [n, Hk, 2d]
            return sorted(zip(layer.key_positions().tolist(), rows.flatten(1).tolist()))
        assert entries(a) == entries(b)
    torch.testing.assert_close(answer_logprobs(engine, forward, question, follow),
                               answer_logprobs(engine, backward, question, follow), atol=1e-5, rtol=1e-5)
    # a document's cache does not depend on the others: encoded again, it is the same
    again = encode_document(engine, base, docs[0])
    assert all(torch.equal(x, y) for x, y in zip(again.keys, encoded[0].keys))


def test_a_joined_cache_answers_again_after_a_rollback(engine):
    prefix, docs, rest = parts()
    _, _, sequence = joined(engine, "ape", prefix, docs)
    mark = sequence.mark()
    first = answer_logprobs(engine, sequence, rest[:QUESTION], rest[QUESTION:])
    sequence.rollback(mark)
    assert sequence.layers[0].num_entries == PREFIX + sum(LENGTHS)
    torch.testing.assert_close(answer_logprobs(engine, sequence, rest[:QUESTION], rest[QUESTION:]), first)


@pytest.mark.parametrize("text, fragment", [
    ("ape(temperature=0)", "ape(temperature=0.0): must be > 0"),
    ("ape(temperature=-0.5)", "ape(temperature=-0.5)"),
    ("ape(temperature=1.5)", "ape(temperature=1.5): must be <= 1.0"),
    ("ape(scale=0)", "ape(scale=0.0): must be > 0"),
    ("ape(scale=2)", "ape(scale=2): must be <= 1.0"),
    ("ape(scale=true)", "ape(scale=True): must be a number"),
    ("ape(temp=0.5)", "ape has no parameter 'temp'; its parameters: temperature, scale"),
    ("ape + snapkv(budget=0.5)", "snapkv + ape is not supported"),
    ("ape + quest", "quest + ape is not supported"),
    ("self_extend + ape", "self_extend + ape is not supported: ape stores each document's keys"),
])
def test_bad_parameters_and_combinations_are_refused_naming_the_value(text, fragment):
    assert_recipe_refused(text, fragment)


def test_documents_need_a_reuse_recipe_and_a_prefix(engine):
    with pytest.raises(kvlab.InputError, match="recipe 'snapkv.*has no reuse method"):
        encode_prefix(engine, parse_recipe("snapkv(budget=0.5)"), [1, 2])
    with pytest.raises(kvlab.InputError, match="shared prefix"):
        encode_prefix(engine, parse_recipe("ape"), [])
    assert str(parse_recipe("yarn(factor=2) + ape")).endswith("ape(temperature=0.9, scale=0.9)")


# -- the Python API, with the real tokenizer ----------------------------------------------------
DOCS = [
    "Passage 1: The lighthouse keeper on Gull Island paints the door green every spring. ",
    "Passage 2: The code of the red door is 4417, and only Alice knows it. ",
    "Passage 3: Trains to the harbour leave every twenty minutes from platform six. ",
]


@pytest.fixture(scope="module")
def text_engine(tokenizer):
    return tiny_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048)


def test_documents_are_encoded_once_and_only_the_question_is_prefilled(text_engine):
    docs = text_engine.documents("ape", instruction="Answer from the passages.\n")
    keys = [docs.add(t) for t in DOCS]
    before = text_engine.counters.prefilled_tokens
    assert docs.add(DOCS[1]) == keys[1] and text_engine.counters.prefilled_tokens == before  # cached
    answer = docs.ask("What is the code of the red door?", max_new_tokens=4)
    question = docs.question_ids("What is the code of the red door?")
    assert answer.stats.prefilled_tokens == len(question)
    assert text_engine.counters.prefilled_tokens == before + len(question)
    assert answer.stats.prompt_tokens == len(docs.sequential_ids("What is the code of the red door?"))
    reordered = docs.ask("What is the code of the red door?", documents=[keys[2], keys[0], keys[1]], max_new_tokens=4)
    assert reordered.token_ids == answer.token_ids
    with pytest.raises(kvlab.InputError, match="document 'nope' was not added"):
        docs.ask("Which?", documents=["nope"])


def test_one_document_at_t_1_s_1_answers_as_full_over_the_same_tokens(text_engine):
    docs = text_engine.documents("ape(temperature=1.0, scale=1.0)", instruction="Read.\n")
    key = docs.add(DOCS[1])
    ape = docs.ask("What is the code?", documents=[key], max_new_tokens=6)
    full = text_engine.generate_ids(docs.sequential_ids("What is the code?", [key]), "full", max_new_tokens=6)
    assert ape.token_ids == full.token_ids
    with pytest.raises(kvlab.InputError, match="has no reuse method"):
        text_engine.documents("full")


def test_the_questions_prefill_counts_every_pair_it_computed(engine):
    """Each question token attends to the prefix, every document and the question up to itself."""
    prefix, docs, rest = parts()
    _, _, sequence = joined(engine, "ape", prefix, docs)
    engine.prefill(sequence, rest[:QUESTION], compress=False)
    heads = engine.config.num_attention_heads
    per_head = QUESTION * (PREFIX + sum(LENGTHS)) + QUESTION * (QUESTION + 1) // 2
    assert sequence.layer_pairs == [heads * per_head] * engine.config.num_hidden_layers
