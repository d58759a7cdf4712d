"""The server's store of encoded contexts: a radix tree of token ids, LRU-bounded by bytes.

What is stored: an *entry* is one context's token ids and the :class:`Sequence` that encoded
them with one recipe (prefilled, then compressed as a whole by the recipe's compress method),
with the logits of its last token. Entries live in one radix tree per namespace
``(tenant, model, recipe)``: a context encoded for one tenant, model or recipe is never found
by another's prompt.

What matches: a request reuses the **longest stored context whose every token is a prefix of
its prompt's tokens**; only the prompt's remaining tokens are prefilled (appended to the cache
uncompressed, as a session's question is), and the cache is rolled back to the stored state
when the request ends. What does not match:

- a prompt that shares only *part* of a stored context (it diverges inside it, or stops before
  its end). A compressed cache is reusable only as a whole: compression chose its entries
  looking at the whole context (SnapKV's observation window is the context's tail), so a
  truncated compressed cache is not the compression of the shorter prefix. kvlab applies the
  same rule to uncompressed (``full``) caches, where a truncation would be exact, so one rule
  holds for every recipe;
- the same text under another recipe, model or tenant (another namespace);
- the same text tokenized differently: matching is on token ids, not on text.

Why a radix tree and not a hash of token blocks: a context ends where the request's structure
puts it (the end of a system prompt, of an earlier turn), at any token, not on a block
boundary; block hashes find only block-aligned prefixes, and a compressed cache cannot be cut
back to one. One walk down the tree (O(prompt tokens)) passes every stored context that
prefixes the prompt and keeps the deepest.

Memory: the store holds at most ``max_bytes`` of measured bytes (each entry's
:meth:`Sequence.nbytes` when it was stored, plus its last logits). Room is made by evicting
the least recently used entries that no request is using: an entry is *pinned* from the moment
a request matches (or creates) it until that request ends, and a pinned entry is never evicted,
so eviction never breaks a running request. An entry that cannot fit is not stored (its
request still runs, on a cache that is freed when it ends).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence as Tokens
from dataclasses import dataclass, field

from torch import Tensor

from kvlab.engine.sequence import Sequence


@dataclass(eq=False)
class Entry:
    """One encoded context: ``tokens`` (ids), the ``sequence`` that holds their (compressed)
    cache, the ``logits`` ``[vocab]`` after its last token (None for a context loaded from a
    file, which does not keep them), and ``nbytes`` measured when it was stored. ``pins`` counts the requests using it; ``stored`` is False for an entry that did
    not fit the store (it is freed when its request ends)."""

    namespace: Hashable
    tokens: tuple[int, ...]
    sequence: Sequence
    logits: Tensor | None
    nbytes: int
    pins: int = 0
    stored: bool = False


@dataclass(eq=False)
class _Node:
    """A radix-tree node: edges by first token -> (label, child); the entry ending here."""

    children: dict[int, tuple[tuple[int, ...], _Node]] = field(default_factory=dict)
    entry: Entry | None = None


class RadixTree:
    """Token-id sequences with edges labelled by runs of tokens (a compressed trie)."""

    def __init__(self) -> None:
        self.root = _Node()

    def insert(self, tokens: tuple[int, ...], entry: Entry) -> Entry | None:
        """Store ``entry`` at ``tokens``; returns the entry it replaced (same tokens), if any."""
        node, i = self.root, 0
        while i < len(tokens):
            edge = node.children.get(tokens[i])
            if edge is None:
                leaf = _Node(entry=entry)
                node.children[tokens[i]] = (tokens[i:], leaf)
                return None
            label, child = edge
            common = _common_length(label, tokens, i)
            if common < len(label):  # split the edge where the new tokens leave it
                middle = _Node(children={label[common]: (label[common:], child)})
                node.children[tokens[i]] = (label[:common], middle)
                child = middle
            node, i = child, i + common
        replaced, node.entry = node.entry, entry
        return replaced

    def longest_prefix(self, tokens: Tokens[int]) -> Entry | None:
        """The entry with the most tokens among those whose tokens all prefix ``tokens``."""
        node, i, best = self.root, 0, self.root.entry
        while i < len(tokens):
            edge = node.children.get(tokens[i])
            if edge is None:
                break
            label, child = edge
            if _common_length(label, tokens, i) < len(label):
                break  # the prompt leaves this edge inside a stored run: no entry below matches
            node, i = child, i + len(label)
            if node.entry is not None:
                best = node.entry
        return best

    def remove(self, tokens: tuple[int, ...]) -> None:
        """Forget the entry at ``tokens``, pruning nodes left with nothing below them."""
        path: list[tuple[_Node, int]] = []
        node, i = self.root, 0
        while i < len(tokens):
            label, child = node.children[tokens[i]]
            path.append((node, tokens[i]))
            node, i = child, i + len(label)
        node.entry = None
        while path and node.entry is None and not node.children:
            parent, first = path.pop()
            del parent.children[first]
            node = parent

    def __bool__(self) -> bool:
        return bool(self.root.children) or self.root.entry is not None


def _common_length(label: tuple[int, ...], tokens: Tokens[int], start: int) -> int:
    n = min(len(label), len(tokens) - start)
    for k in range(n):
        if label[k] != tokens[start + k]:
            return k
    return n


class ContextStore:
    """Encoded contexts by namespace, LRU-bounded by ``max_bytes`` (see the module docstring).

    Used from the server's one engine thread only (no locking)."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r}: must be an integer >= 0")
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.evictions = 0
        self.beside: Callable[[], int] = lambda: 0
        """Bytes held under the same cap outside this store (the server's APE documents)."""
        self._trees: dict[Hashable, RadixTree] = {}
        self._lru: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, oldest first

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, namespace: Hashable, tokens: Tokens[int]) -> Entry | None:
        """The longest stored context of ``namespace`` prefixing ``tokens``, pinned (call
        :meth:`release` when done) and marked most recently used; None when none matches."""
        tree = self._trees.get(namespace)
        entry = tree.longest_prefix(tokens) if tree is not None else None
        if entry is not None:
            entry.pins += 1
            self._lru.move_to_end(id(entry))
        return entry

    def make_room(self, nbytes: int) -> int:
        """Evict least recently used unpinned entries until ``nbytes`` more would fit; returns
        how many were evicted (all that can go, when even that is not enough)."""
        evicted = 0
        for entry in list(self._lru.values()):
            if self.held_bytes + self.beside() + nbytes <= self.max_bytes:
                break
            if entry.pins == 0:
                self._drop(entry)
                evicted += 1
        self.evictions += evicted
        return evicted

    def add(self, namespace: Hashable, tokens: Tokens[int], sequence: Sequence, logits: Tensor | None) -> Entry:
        """Make an entry for a freshly encoded context, pinned. It is stored when it fits
        (after evicting unpinned entries); otherwise it lives only until :meth:`release`."""
        nbytes = sequence.nbytes() + (logits.numel() * logits.element_size() if logits is not None else 0)
        entry = Entry(namespace, tuple(tokens), sequence, logits, nbytes, pins=1)
        self.make_room(nbytes)
        if self.held_bytes + self.beside() + nbytes <= self.max_bytes and entry.tokens:
            tree = self._trees.setdefault(namespace, RadixTree())
            replaced = tree.insert(entry.tokens, entry)
            if replaced is not None:  # the same context, encoded again: keep the newer
                self._forget(replaced)
            entry.stored = True
            self.held_bytes += nbytes
            self._lru[id(entry)] = entry
        return entry

    def release(self, entry: Entry) -> None:
        """A request is done with ``entry``."""
        entry.pins -= 1

    def entries(self) -> list[Entry]:
        """Stored entries, least recently used first."""
        return list(self._lru.values())

    def _drop(self, entry: Entry) -> None:
        tree = self._trees[entry.namespace]
        tree.remove(entry.tokens)
        if not tree:
            del self._trees[entry.namespace]
        self._forget(entry)

    def _forget(self, entry: Entry) -> None:
        if self._lru.pop(id(entry), None) is not None:
            self.held_bytes -= entry.nbytes
        entry.stored = False


__all__ = ["ContextStore", "Entry", "RadixTree"]
