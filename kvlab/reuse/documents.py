"""Documents encoded once each, apart, and joined in any order for a question (APE).

The mechanics of APE's parallel encoding (:mod:`kvlab.reuse.ape` has the attention):

- :func:`encode_prefix` encodes the shared prefix ``P`` (the chat template's start and an
  instruction) once;
- :func:`encode_document` encodes one document after it: its tokens attend causally to the
  prefix and to themselves, at positions ``|P| .. |P| + L - 1``; its keys (rotated at those
  positions) and values are kept, the prefix's cache is left as it was;
- :func:`join` builds a cache of the prefix followed by any documents, in any order: their
  entries concatenated as they were encoded (positions shared between documents), the
  documents' entries marked by a :class:`~kvlab.reuse.base.DocumentSpan`; the question is then
  appended at position ``|P| + max L`` and the recipe's reuse method attends.

:class:`Documents` is the Python API (``engine.documents()``): what is cached is each
document's encoded cache (every layer's keys and values, no logits), keyed by the SHA-256 of
the prefix's and the document's token ids (:func:`document_key`), within one
:class:`Documents` (one engine, recipe and prefix); a document added twice is encoded once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
import torch
from torch import Tensor

from kvlab.engine.prompt import QUESTION_SEPARATOR
from kvlab.engine.results import Answer, check_max_new_tokens, check_text
from kvlab.engine.sampling import Sampling
from kvlab.engine.sequence import Sequence
from kvlab.errors import InputError
from kvlab.recipe import Recipe, parse_recipe
from kvlab.reuse.base import DOCUMENTS, DocumentSpan
from kvlab.reuse.session import SessionEngine, answer_turn

_SENTINEL = "\u2063KVLAB_DOCUMENTS\u2063"


@dataclass(eq=False)
class EncodedDocument:
    """One document's cache, encoded after a prefix of ``prefix_tokens`` tokens: per layer,
    keys (rotated at positions ``prefix_tokens ..``) and values ``[batch, kv_heads, L, d]``."""

    tokens: tuple[int, ...]
    prefix_tokens: int
    keys: list[Tensor]
    values: list[Tensor]

    def __len__(self) -> int:
        return len(self.tokens)

    def nbytes(self) -> int:
        """Bytes of every tensor held (keys and values, all layers)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def document_key(prefix_ids: list[int] | tuple[int, ...], ids: list[int] | tuple[int, ...]) -> str:
    """The key of a document's cache: SHA-256 of the prefix's and the document's token ids
    (a document's cache is valid only after the prefix it was encoded after)."""
    digest = hashlib.sha256()
    digest.update(",".join(map(str, prefix_ids)).encode())
    digest.update(b"|")
    digest.update(",".join(map(str, ids)).encode())
    return digest.hexdigest()


def check_recipe(recipe: Recipe) -> None:
    """Refuse a recipe without a reuse method: documents are joined for one to attend."""
    if recipe.reuse is None:
        raise InputError(
            f"recipe '{recipe}' has no reuse method; documents encoded apart are joined for one "
            "to attend over (e.g. 'ape' or 'ape(temperature=0.9, scale=0.9)')"
        )


def encode_prefix(engine: SessionEngine, recipe: Recipe, prefix_ids: list[int]) -> Sequence:
    """The shared prefix's cache (every document is encoded after it)."""
    check_recipe(recipe)
    if not prefix_ids:
        raise InputError("prefix_ids is empty: APE encodes every document after a shared prefix "
                         "(the chat template's start, an instruction)")
    sequence = engine.new_sequence(recipe)
    engine.prefill(sequence, list(prefix_ids), compress=True)
    return sequence


def encode_document(engine: SessionEngine, prefix: Sequence, ids: list[int]) -> EncodedDocument:
    """Encode ``ids`` after ``prefix`` (causal over the prefix and itself, at the positions
    after the prefix); ``prefix`` is left as it was."""
    if not ids:
        raise InputError("a document encodes to zero tokens")
    mark = prefix.mark()
    start = prefix.seen
    try:
        engine.prefill(prefix, list(ids), compress=False)
        keys = [layer.keys[:, :, start:].clone() for layer in prefix.layers]
        values = [layer.values[:, :, start:].clone() for layer in prefix.layers]
    finally:
        prefix.rollback(mark)
    return EncodedDocument(tuple(ids), start, keys, values)


def join(engine: SessionEngine, prefix: Sequence, documents: list[EncodedDocument]) -> Sequence:
    """A new cache: the prefix's entries, then the documents' in the order given (positions as
    encoded: every document from ``|P|`` on), marked for the recipe's reuse method."""
    if not documents:
        raise InputError("no documents to join: give at least one")
    start = prefix.seen
    for doc in documents:
        if doc.prefix_tokens != start:
            raise InputError(
                f"a document encoded after a {doc.prefix_tokens}-token prefix cannot join a "
                f"{start}-token prefix; encode it after this one"
            )
    sequence = engine.new_sequence(prefix.recipe)
    device = prefix.layers[0].keys.device
    positions = torch.cat([
        torch.arange(start, device=device),
        *(torch.arange(start, start + len(doc), device=device) for doc in documents),
    ])
    end = start + sum(len(doc) for doc in documents)
    for i, layer in enumerate(sequence.layers):
        source = prefix.layers[i]
        keys = torch.cat([source.keys, *(doc.keys[i] for doc in documents)], dim=2)
        values = torch.cat([source.values, *(doc.values[i] for doc in documents)], dim=2)
        layer.load_entries(keys, values, positions)
        layer.side[DOCUMENTS] = DocumentSpan(start, end)
    return sequence


class Documents:
    """A shared prefix encoded once; documents added once each; questions over any of them,
    in any order (APE, :mod:`kvlab.reuse.ape`). Built by ``engine.documents(...)``.

    The prompt is the chat template's one user turn ``instruction + documents + "\\n\\n" +
    question``: the prefix is the template's start and ``instruction``, each document is its
    text alone (tokenized apart), the question is the rest of the turn. :meth:`sequential_ids`
    gives the same token ids in one sequence, the prompt ``full`` encodes together."""

    def __init__(
        self, engine: SessionEngine, recipe: Recipe | str = "ape", instruction: str = "",
        allow_overflow: bool = False,
    ) -> None:
        self.engine = engine
        self.recipe = parse_recipe(recipe)
        check_recipe(self.recipe)
        if not isinstance(instruction, str):
            raise InputError(f"instruction={instruction!r}: must be a string")
        self.allow_overflow = allow_overflow
        self._format = engine.prompt_format
        self.instruction = instruction
        self.prefix_ids = self._format.encode(self._format.context_head(instruction), first=True)
        self.prefix = encode_prefix(engine, self.recipe, self.prefix_ids)
        self.cache: dict[str, EncodedDocument] = {}
        """Encoded documents by :func:`document_key`, in the order they were added."""

    def add(self, text: str) -> str:
        """Encode the document ``text`` after the prefix (unless it already was); its key."""
        check_text(text, "document")
        ids = self._format.encode(text, first=False)
        key = document_key(self.prefix_ids, ids)
        if key not in self.cache:
            self.engine.check_fits(self.recipe, len(self.prefix_ids) + len(ids), 0, self.allow_overflow)
            self.cache[key] = encode_document(self.engine, self.prefix, ids)
        return key

    def _chosen(self, documents: list[str] | None) -> list[EncodedDocument]:
        keys = list(self.cache) if documents is None else documents
        if isinstance(keys, str) or not isinstance(keys, (list, tuple)):
            raise InputError(f"documents={keys!r}: must be a list of keys returned by add()")
        unknown = [k for k in keys if k not in self.cache]
        if unknown:
            raise InputError(f"document {unknown[0]!r} was not added; added: {', '.join(self.cache) or 'none'}")
        return [self.cache[k] for k in keys]

    def question_ids(self, question: str, answer_prefix: str = "") -> list[int]:
        """The token ids after the documents: the separator, the question, the template's end
        of turn and the answer's start."""
        check_text(question, "question")
        if not isinstance(answer_prefix, str):
            raise InputError(f"answer_prefix={answer_prefix!r}: must be a string")
        content = self.instruction + _SENTINEL + QUESTION_SEPARATOR + question
        full = self._format.render([{"role": "user", "content": content}], answer_prefix)
        return self._format.encode(full.split(_SENTINEL, 1)[1], first=False)

    def sequential_ids(self, question: str, documents: list[str] | None = None, answer_prefix: str = "") -> list[int]:
        """The same prompt as one sequence (prefix, documents in order, question): what ``full``
        encodes together."""
        ids = list(self.prefix_ids)
        for doc in self._chosen(documents):
            ids += doc.tokens
        return ids + self.question_ids(question, answer_prefix)

    def ask(
        self, question: str, documents: list[str] | None = None, answer_prefix: str = "",
        max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
    ) -> Answer:
        """Answer ``question`` over ``documents`` (keys from :meth:`add`, in this order; default:
        every added document). Only the question is prefilled; ``stats.prefill_s`` counts the
        join and the question's prefill, ``stats.prompt_tokens`` every token of the prompt."""
        check_max_new_tokens(max_new_tokens)
        sampling = Sampling(temperature, top_p, seed)
        chosen = self._chosen(documents)
        ids = self.question_ids(question, answer_prefix)
        start = time.perf_counter()
        sequence = join(self.engine, self.prefix, chosen)
        joined_s = time.perf_counter() - start
        answer, _ = answer_turn(
            self.engine, sequence, ids, max_new_tokens, sampling.sampler(self.engine.device),
            allow_overflow=self.allow_overflow,
        )
        total = len(self.prefix_ids) + sum(len(d) for d in chosen) + len(ids)
        stats = replace(answer.stats, prompt_tokens=total, prefill_s=answer.stats.prefill_s + joined_s)
        return replace(answer, stats=stats)


__all__ = ["Documents", "EncodedDocument", "document_key", "encode_document", "encode_prefix", "join"]
