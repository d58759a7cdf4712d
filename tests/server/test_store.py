"""The store of encoded contexts: radix-tree matching on whole contexts, LRU by bytes, pins."""

from __future__ import annotations

import pytest
import torch

from kvlab.server.store import ContextStore, Entry, RadixTree


def entry(tokens) -> Entry:
    return Entry("ns", tuple(tokens), sequence=None, logits=torch.zeros(1), nbytes=0)


def test_the_longest_whole_context_that_prefixes_the_prompt_matches():
    tree = RadixTree()
    short, long, other = entry([1, 2, 3]), entry([1, 2, 3, 4, 5, 6]), entry([1, 2, 9])
    for e in (long, other, short):  # inserted out of order: edges are split as needed
        tree.insert(e.tokens, e)
    assert tree.longest_prefix([1, 2, 3, 4, 5, 6, 7]) is long
    assert tree.longest_prefix([1, 2, 3, 4, 5, 6]) is long
    assert tree.longest_prefix([1, 2, 3, 4, 5]) is short  # stops inside `long`: not a match
    assert tree.longest_prefix([1, 2, 3, 4, 0, 6, 7]) is short  # diverges inside `long`
    assert tree.longest_prefix([1, 2, 9, 9]) is other
    assert tree.longest_prefix([1, 2]) is None  # a prompt shorter than every context
    assert tree.longest_prefix([7, 1, 2, 3]) is None


def test_removing_prunes_and_keeps_the_rest():
    tree = RadixTree()
    a, b = entry([1, 2, 3]), entry([1, 2, 3, 4])
    tree.insert(a.tokens, a)
    tree.insert(b.tokens, b)
    tree.remove(b.tokens)
    assert tree.longest_prefix([1, 2, 3, 4, 5]) is a
    tree.remove(a.tokens)
    assert not tree and tree.longest_prefix([1, 2, 3]) is None


class FakeSequence:
    def __init__(self, nbytes: int) -> None:
        self._nbytes = nbytes

    def nbytes(self) -> int:
        return self._nbytes


def add(store, tokens, nbytes, namespace="ns"):
    e = store.add(namespace, tokens, FakeSequence(nbytes - 4), torch.zeros(1))  # + 4 bytes of logits
    store.release(e)
    return e


def test_least_recently_used_unpinned_entries_are_evicted_first():
    store = ContextStore(max_bytes=300)
    a, b = add(store, [1], 100), add(store, [2], 100)
    c = add(store, [3], 100)
    assert store.held_bytes == 300 and len(store) == 3
    store.release(store.match("ns", [1, 5]) or pytest.fail("no match"))  # a is now the most recent
    add(store, [4], 100)
    assert not b.stored and a.stored and c.stored and store.evictions == 1
    assert store.match("ns", [2]) is None


def test_a_pinned_entry_is_never_evicted():
    store = ContextStore(max_bytes=200)
    a = add(store, [1], 100)
    pinned = store.match("ns", [1, 2])
    assert pinned is a and a.pins == 1
    add(store, [2], 100)
    big = add(store, [3], 150)  # needs a's room, but a is in use: b goes, and big is not stored
    assert a.stored and not big.stored and store.held_bytes <= 200
    store.release(pinned)
    bigger = add(store, [4], 200)
    assert bigger.stored and not a.stored


def test_namespaces_do_not_see_each_other():
    store = ContextStore(max_bytes=1000)
    add(store, [1, 2], 10, namespace=("alice", "m", "full"))
    assert store.match(("bob", "m", "full"), [1, 2, 3]) is None
    assert store.match(("alice", "m", "snapkv(budget=0.5)"), [1, 2, 3]) is None
    assert store.match(("alice", "m", "full"), [1, 2, 3]) is not None


def test_the_context_store_and_the_documents_share_one_cap():
    """``--max-cache-gib`` bounds the stored contexts and APE's documents together: each side
    evicts its own least recently used entries to fit beside what the other holds."""
    from kvlab.server.documents import DocumentCache

    store = ContextStore(max_bytes=300)
    documents = DocumentCache(300, beside=lambda: store.held_bytes)
    store.beside = lambda: documents.held_bytes
    add(store, [1], 100)
    add(store, [2], 100)
    documents.put(("doc", 1), object(), 100)
    assert store.held_bytes + documents.held_bytes == 300
    documents.put(("doc", 2), object(), 100)  # no room beside the contexts: doc 1 goes first
    assert documents.get(("doc", 1)) is None and documents.get(("doc", 2)) is not None
    assert store.held_bytes + documents.held_bytes == 300
    documents.put(("doc", 3), object(), 250)  # cannot fit beside 200 bytes of contexts at all:
    assert documents.get(("doc", 3)) is None and documents.get(("doc", 2)) is not None  # nothing evicted
    c = add(store, [3], 100)  # the contexts' oldest goes to make room beside the document
    assert c.stored and store.match("ns", [1]) is None
    assert store.held_bytes + documents.held_bytes == 300
