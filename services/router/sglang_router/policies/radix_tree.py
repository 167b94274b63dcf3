"""Approximate radix trees over token ids: the router's guess of what each worker has cached.

"Approximate" because the router never hears from the worker's real prefix cache: it records the
prompts it routed to a worker and assumes they stay cached until its own bounded tree forgets them.
That is SGLang gateway's ``cache_aware`` design, on token ids instead of characters.

One compressed radix tree per worker. Edges carry token tuples; ``size`` is the number of tokens on
all edges. ``insert`` touches every node on the path with a logical clock, so a parent is always at
least as recent as its children and the least recently used node is always a leaf. When ``size``
exceeds ``max_size``, whole leaves are evicted, least recently used first (ties: the leaf that became
evictable first), until it fits.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence


class _Node:
    __slots__ = ("children", "key", "last_access", "parent")

    def __init__(self, key: tuple[int, ...], parent: _Node | None, last_access: int) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_access = last_access


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ApproxRadixTree:
    """Token-id radix tree with LRU eviction of leaves.

    Contract:
    - ``match(tokens)`` returns the length of the longest prefix of ``tokens`` stored in the tree; it
      does not change recency.
    - ``insert(tokens)`` stores ``tokens[:max_size]``, makes its path the most recent, then evicts
      least recently used leaves until ``size <= max_size``.
    - ``check_integrity()`` raises ``AssertionError`` when the size counter, edge labels or recency
      order are inconsistent.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.root = _Node((), None, 0)
        self.size = 0
        self._clock = 0
        self._seq = itertools.count()
        self._leaves: list[tuple[int, int, _Node]] = []  # lazy heap of (last_access, seq, leaf)
        self.num_evicted_tokens = 0

    def __len__(self) -> int:
        return self.size

    # ------------------------------------------------------------------ queries

    def match(self, tokens: Sequence[int]) -> int:
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common_prefix(child.key, tokens[i : i + len(child.key)])
            i += k
            if k < len(child.key):
                break
            node = child
        return i

    # ------------------------------------------------------------------ updates

    def insert(self, tokens: Sequence[int]) -> None:
        tokens = tuple(tokens[: self.max_size])
        if not tokens:
            return
        self._clock += 1
        now = self._clock
        node, i = self.root, 0
        node.last_access = now
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(tokens[i:], node, now)
                node.children[tokens[i]] = leaf
                self.size += len(leaf.key)
                self._push_leaf(leaf)
                break
            k = _common_prefix(child.key, tokens[i : i + len(child.key)])
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = now
            node, i = child, i + k
        else:
            if not node.children:
                self._push_leaf(node)  # the path ended on an existing leaf: its recency changed
        self._evict()

    def clear(self) -> None:
        self.root = _Node((), None, 0)
        self.size = 0
        self._leaves.clear()

    def _split(self, child: _Node, k: int) -> _Node:
        """Cut ``child``'s edge after ``k`` tokens; return the new upper node (``child`` keeps the rest)."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.key[:k], parent, child.last_access)
        parent.children[child.key[0]] = upper
        child.key = child.key[k:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def _push_leaf(self, leaf: _Node) -> None:
        heapq.heappush(self._leaves, (leaf.last_access, next(self._seq), leaf))
        if len(self._leaves) > 4 * max(self.size, 16):
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._leaves = [(n.last_access, next(self._seq), n) for n in self._iter_nodes() if not n.children and n is not self.root]
        heapq.heapify(self._leaves)

    def _evict(self) -> None:
        while self.size > self.max_size and self._leaves:
            access, _, leaf = heapq.heappop(self._leaves)
            if leaf.parent is None or leaf.children or leaf.last_access != access:
                continue  # stale entry: detached, no longer a leaf, or touched since
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            leaf.parent = None
            self.size -= len(leaf.key)
            self.num_evicted_tokens += len(leaf.key)
            if parent is not self.root and not parent.children:
                self._push_leaf(parent)

    # ------------------------------------------------------------------ invariants

    def _iter_nodes(self) -> Iterable[_Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def check_integrity(self) -> None:
        total = 0
        for node in self._iter_nodes():
            if node is not self.root:
                assert node.key, "empty edge below the root"
                assert node.parent is not None and node.parent.children.get(node.key[0]) is node
                assert node.parent is self.root or node.parent.last_access >= node.last_access, (
                    "a parent is older than its child"
                )
                total += len(node.key)
            for first, child in node.children.items():
                assert child.key[0] == first, "child indexed under the wrong token"
        assert total == self.size, f"size counter {self.size} != tokens on edges {total}"
        assert self.size <= self.max_size, f"size {self.size} exceeds max_size {self.max_size}"


class LocalTreeIndex:
    """One :class:`ApproxRadixTree` per worker, in this router process (replicas do not share it)."""

    def __init__(self, max_tree_size: int) -> None:
        self.max_tree_size = max_tree_size
        self.trees: dict[str, ApproxRadixTree] = {}

    async def match(self, tokens: Sequence[int], worker_ids: Sequence[str]) -> dict[str, int]:
        return {w: self.trees[w].match(tokens) if w in self.trees else 0 for w in worker_ids}

    async def insert(self, tokens: Sequence[int], worker_id: str) -> None:
        tree = self.trees.get(worker_id)
        if tree is None:
            tree = self.trees[worker_id] = ApproxRadixTree(self.max_tree_size)
        tree.insert(tokens)

    def tree_size(self, worker_id: str) -> int:
        tree = self.trees.get(worker_id)
        return tree.size if tree is not None else 0

    def remove_worker(self, worker_id: str) -> None:
        self.trees.pop(worker_id, None)

    async def close(self) -> None:
        self.trees.clear()
