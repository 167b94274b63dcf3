"""RadixAttention prefix cache: a radix tree from token-id prefixes to the KV pages that hold them.

Keys are page-granular. With ``page_size`` P a token sequence is cut into *units* of P tokens (a
tuple each); only whole pages are stored or matched, and a trailing partial page is ignored. A node
holds a run of units, the page id of each unit (one page per unit) and each page's chained hash
(see ``events.py``). Nodes split only at unit boundaries. Every ``extra_key`` (LoRA id, cache salt,
...) has its own root, so equal tokens under different extra_keys never match.

Ownership. A page the tree holds is *cached*: the tree frees it to the allocator on eviction or
flush, and nobody else frees it. The tree never frees a caller's page: ``insert`` hands back the
caller's pages it did not take (``duplicate_pages``) and the caller frees those.

Locking. ``lock(node)`` pins the prefix ending at ``node``: it and every ancestor get
``lock_ref += 1`` and are never evicted while ``lock_ref > 0``. A node object keeps the position of
its *end* for its whole life (a split gives the upper part to a new parent node), so a locked
``MatchResult.node`` keeps pinning exactly the matched prefix across other requests' inserts.

The engine's flow for one request (single-threaded, the scheduler owns the cache)::

    m = cache.match_prefix(tokens, extra_key); cache.lock(m.node)        # pin the hit
    pages = m.pages + allocator.alloc(n)  (evict(...) first if short)    # compute the rest
    r = cache.insert(tokens, pages, extra_key); allocator.free(r.duplicate_pages)
    cache.lock(r.node); cache.unlock(m.node)                             # while the request lives
    ... cache.unlock(r.node) when the request finishes

Eviction (the choice made here): candidates are unlocked leaves, ordered by the policy (``lru``:
smallest ``last_access``; ``lfu``: smallest ``hit_count`` then smallest ``last_access``).
Eviction is *partial*: when a leaf holds more pages than still needed, only its last pages are
evicted and the leaf keeps its head. So ``evict(n)`` frees exactly ``min(n, num_evictable_pages)``
pages. Pages come back deepest first (a leaf's last page first); a parent that becomes an unlocked
leaf joins the candidates with its own priority. ``last_access`` is a logical clock advanced once per
node touched, root to leaf, so it is unique per node and the order is total and deterministic.

The candidates live in a heap kept across calls, so ``evict`` costs O(log n) per leaf instead of a
walk over the whole tree (a decode step that needs one page per request crossing a page boundary
called it ~16 times per step at batch 256). Entries are pushed whenever a node's priority or leaf
status may have changed and checked when popped: an entry counts only if its node is still in the
tree, an unlocked leaf, and its recorded priority is the node's current one. The heap is rebuilt from
the tree when stale entries outnumber the live nodes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sglang.engine.prefix_cache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventPublisher,
    hash_page,
)
from sglang.engine.prefix_cache.eviction import EvictionPolicy, create_policy

if TYPE_CHECKING:
    from sglang.engine.memory.page_allocator import PageAllocator

Unit = tuple[int, ...]


class TreeNode:
    """One edge of the radix tree: ``key[i]`` is held in page ``pages[i]`` with hash ``hashes[i]``.

    ``lock_ref`` counts locks on this node plus locks on its descendants; ``direct_locks`` only those
    taken on this node. A root has an empty key and is never locked, evicted or counted.
    """

    __slots__ = (
        "children",
        "direct_locks",
        "extra_key",
        "hashes",
        "hit_count",
        "id",
        "is_root",
        "key",
        "last_access",
        "lock_ref",
        "pages",
        "parent",
        "removed",
    )

    def __init__(
        self,
        node_id: int,
        extra_key: str | None,
        parent: TreeNode | None = None,
        key: list[Unit] | None = None,
        pages: list[int] | None = None,
        hashes: list[int] | None = None,
        is_root: bool = False,
    ) -> None:
        self.id = node_id
        self.extra_key = extra_key
        self.parent = parent
        self.key: list[Unit] = key if key is not None else []
        self.pages: list[int] = pages if pages is not None else []
        self.hashes: list[int] = hashes if hashes is not None else []
        self.children: dict[Unit, TreeNode] = {}
        self.is_root = is_root
        self.lock_ref = 0
        self.direct_locks = 0
        self.last_access = 0
        self.hit_count = 0
        self.removed = False

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def tokens(self) -> tuple[int, ...]:
        """This node's key flattened to token ids."""
        return tuple(t for unit in self.key for t in unit)

    def __repr__(self) -> str:
        kind = "root" if self.is_root else f"pages={self.pages}"
        return f"TreeNode(id={self.id}, {kind}, lock_ref={self.lock_ref}, extra_key={self.extra_key!r})"


@dataclass
class MatchResult:
    pages: list[int]
    """The tree's page ids covering the matched prefix, in order."""
    num_tokens: int
    """``len(pages) * page_size``."""
    node: TreeNode
    """Deepest matched node (a root when nothing matched); lock it to pin the prefix."""


@dataclass
class InsertResult:
    pages: list[int]
    """The tree's page ids for the whole inserted sequence after insertion."""
    node: TreeNode
    """The node that ends exactly at the end of the inserted sequence (a root for an empty insert)."""
    num_new_pages: int
    """Pages the tree took ownership of (the tail of the caller's pages)."""
    duplicate_pages: list[int]
    """Caller pages not taken because the tree already held that content; the CALLER frees them."""


@dataclass
class CacheStats:
    num_query_tokens: int = 0
    """Tokens asked for in ``match_prefix`` (raw lengths, including partial pages)."""
    num_hit_tokens: int = 0
    """Tokens ``match_prefix`` found cached."""
    num_evictions: int = 0
    """Pages freed by ``evict`` (``flush`` is not counted)."""

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


class RadixCache:
    """Page-granular radix prefix cache. Not thread-safe: the scheduler thread owns it."""

    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        eviction_policy: str = "lru",
        publisher: KVEventPublisher | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if allocator.page_size != page_size:
            raise ValueError(f"page_size {page_size} != allocator page_size {allocator.page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.policy: EvictionPolicy = create_policy(eviction_policy)
        self.publisher = publisher
        self.stats = CacheStats()
        self._roots: dict[str | None, TreeNode] = {}
        self._cached: set[int] = set()
        self._num_locked = 0
        self._clock = 0
        self._ids = itertools.count(1)
        # Eviction candidates: (priority, id, node), possibly stale (see the module docstring).
        self._heap: list[tuple[tuple[int, ...], int, TreeNode]] = []
        self._num_nodes = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_cached_pages(self) -> int:
        return len(self._cached)

    @property
    def num_locked_pages(self) -> int:
        """Pages in nodes with ``lock_ref > 0``."""
        return self._num_locked

    @property
    def num_evictable_pages(self) -> int:
        """Pages :meth:`evict` could free now (every unlocked node is eventually a leaf)."""
        return len(self._cached) - self._num_locked

    @property
    def hit_rate(self) -> float:
        """``stats.hit_rate``: matched / asked tokens over all ``match_prefix`` calls."""
        return self.stats.hit_rate

    @property
    def num_evictions(self) -> int:
        """``stats.num_evictions``: pages freed by ``evict`` so far."""
        return self.stats.num_evictions

    def match_prefix(self, token_ids: Sequence[int], extra_key: str | None = None) -> MatchResult:
        """Longest cached whole-page prefix of ``token_ids`` under ``extra_key``.

        Touches the matched nodes (``last_access``, ``hit_count += 1``) and splits the last one so
        that ``node`` ends exactly at the match. Locks nothing: lock ``node`` before anything can
        evict (i.e. before the next cache or allocator call) to keep ``pages`` valid.
        """
        units = self._units(token_ids)
        self.stats.num_query_tokens += len(token_ids)
        root = self._roots.get(extra_key)
        if root is None or not units:
            return MatchResult([], 0, root or self._new_root(extra_key))
        nodes, pages = self._descend(root, units)
        self._touch(nodes, hit=True)
        self.stats.num_hit_tokens += len(pages) * self.page_size
        return MatchResult(pages, len(pages) * self.page_size, nodes[-1] if nodes else root)

    def peek_prefix_len(self, token_ids: Sequence[int], extra_key: str | None = None) -> int:
        """Tokens ``match_prefix`` would match now, read-only: no touch, no split, no stats.

        For schedulers that rank waiting requests by cached prefix (LPM) without disturbing the
        eviction order or the hit rate.
        """
        root = self._roots.get(extra_key)
        if root is None:
            return 0
        return sum(m for _, m in self._walk(root, self._units(token_ids))) * self.page_size

    # ------------------------------------------------------------------ insert

    def insert(
        self, token_ids: Sequence[int], pages: Sequence[int], extra_key: str | None = None,
        after: TreeNode | None = None,
    ) -> InsertResult:
        """Cache ``token_ids`` held in ``pages`` (one page per ``page_size`` tokens).

        The pages of the not-yet-cached suffix pass to the tree (cached from now on; the caller must
        not free them). For the already-cached prefix the tree keeps its own pages: a caller page
        equal to the tree's page (it came from ``match_prefix``) is simply shared, any other caller
        page is returned in ``duplicate_pages`` for the caller to free. Touches the path
        (``last_access`` only). Raises ValueError, changing nothing, when lengths disagree, a page
        id is out of range or repeated, or a page the tree holds is passed at another position.

        ``after`` (a node of this tree under ``extra_key``, e.g. the ``node`` of an earlier insert
        that the caller still locks): ``token_ids`` and ``pages`` continue the prefix that ends at
        ``after`` (a node keeps its end for life), so only the continuation is converted, walked
        and validated, and ``InsertResult.pages`` covers the continuation only. The path is touched
        exactly as a full insert would touch it (a finishing request of 1,280 tokens with 1,024
        cached: ~4x less host time).
        """
        caller_pages = [int(p) for p in pages]
        units = self._units(token_ids)
        if len(units) * self.page_size != len(token_ids) or len(units) != len(caller_pages):
            raise ValueError(f"{len(token_ids)} tokens != {len(caller_pages)} pages * page_size {self.page_size}")
        start: TreeNode | None = self._roots.get(extra_key)
        lead: list[TreeNode] = []
        if after is not None and not after.is_root:
            if after.removed or after.extra_key != extra_key:
                raise ValueError(f"insert after {after!r}: not a node of this tree under extra_key {extra_key!r}")
            start, lead = after, self._ancestors(after)
        path = self._walk(start, units) if start is not None else []
        self._validate_pages(caller_pages, [p for n, m in path for p in n.pages[:m]])
        if not units:
            return InsertResult([], start or self._new_root(extra_key), 0, [])

        if start is None:
            start = self._roots[extra_key] = self._new_root(extra_key)
        nodes, tree_pages = self._descend_path(path)
        self._touch(lead + nodes, hit=False)
        node = nodes[-1] if nodes else start
        duplicates = [c for c, t in zip(caller_pages, tree_pages, strict=False) if c != t]
        n_match = len(tree_pages)
        new_pages = caller_pages[n_match:]
        if new_pages:
            parent_hash = None if node.is_root else node.hashes[-1]
            hashes: list[int] = []
            prev = parent_hash
            for unit in units[n_match:]:
                prev = hash_page(prev, unit, extra_key)
                hashes.append(prev)
            new = TreeNode(next(self._ids), extra_key, node, units[n_match:], new_pages, hashes)
            node.children[new.key[0]] = new
            self._num_nodes += 1
            self._touch([new], hit=False)
            self._cached.update(new_pages)
            node = new
            block_tokens = [t for unit in units[n_match:] for t in unit]
            self._publish([BlockStored(hashes, parent_hash, block_tokens, self.page_size, extra_key)])
        return InsertResult(tree_pages + new_pages, node, len(new_pages), duplicates)

    @staticmethod
    def _ancestors(node: TreeNode) -> list[TreeNode]:
        """``node`` and its non-root ancestors, root side first (the path a walk from the root takes)."""
        chain: list[TreeNode] = []
        cur: TreeNode | None = node
        while cur is not None and not cur.is_root:
            chain.append(cur)
            cur = cur.parent
        chain.reverse()
        return chain

    # ------------------------------------------------------------------ locking

    def lock(self, node: TreeNode) -> None:
        """Pin the prefix ending at ``node``: ``lock_ref += 1`` on it and every ancestor. A root is a no-op."""
        if node.is_root:
            return
        if node.removed:
            raise ValueError(f"cannot lock {node!r}: it was evicted")
        node.direct_locks += 1
        n: TreeNode | None = node
        while n is not None and not n.is_root:
            if n.lock_ref == 0:
                self._num_locked += len(n.pages)
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one :meth:`lock` of ``node``. Raises ValueError if ``node`` holds no lock of its own."""
        if node.is_root:
            return
        if node.direct_locks <= 0:
            raise ValueError(f"unlock of {node!r} without a matching lock")
        node.direct_locks -= 1
        n: TreeNode | None = node
        while n is not None and not n.is_root:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._num_locked -= len(n.pages)
                self._candidate(n)
            n = n.parent

    # ------------------------------------------------------------------ eviction

    def evict(self, num_pages: int) -> list[int]:
        """Free exactly ``min(num_pages, num_evictable_pages)`` cached pages to the allocator.

        Unlocked leaves go in policy order; the last leaf may be evicted partially (its tail first).
        Returns the freed page ids in eviction order (deepest first within a leaf) and publishes
        one ``BlockRemoved`` with their hashes in the same order. Locked nodes are never touched.
        """
        if num_pages <= 0:
            return []
        freed: list[int] = []
        freed_hashes: list[int] = []
        while self._heap and len(freed) < num_pages:  # not aliased: ``_candidate`` may rebuild it
            prio, _, node = heapq.heappop(self._heap)
            if node.removed or not node.is_leaf or node.lock_ref or prio != self.policy.priority(node):
                continue  # stale: a current entry for this node is elsewhere in the heap, if any
            take = min(num_pages - len(freed), len(node.pages))
            freed.extend(reversed(node.pages[-take:]))
            freed_hashes.extend(reversed(node.hashes[-take:]))
            if take < len(node.pages):
                del node.key[-take:], node.pages[-take:], node.hashes[-take:]
                self._candidate(node)  # still a candidate, with its priority after the cut
                continue
            parent = self._remove_leaf(node)
            if parent.is_root:
                if not parent.children and self._roots.get(parent.extra_key) is parent:
                    del self._roots[parent.extra_key]
            else:
                self._candidate(parent)
        self._cached.difference_update(freed)
        self.allocator.free(freed)
        self.stats.num_evictions += len(freed)
        if freed:
            self._publish([BlockRemoved(freed_hashes)])
        return freed

    def flush(self) -> bool:
        """If nothing is locked, free every cached page, clear the tree, publish ``AllBlocksCleared``
        and return True; otherwise return False and change nothing."""
        if self._num_locked:
            return False
        pages: list[int] = []
        for node in self._iter_nodes():
            pages.extend(node.pages)
            node.removed = True
            node.parent = None
        self._roots.clear()
        self._cached.clear()
        self._heap.clear()
        self._num_nodes = 0
        self.allocator.free(pages)
        self._publish([AllBlocksCleared()])
        return True

    # ------------------------------------------------------------------ introspection

    def dump(self) -> dict[str | None, list[Any]]:
        """Exact tree shape: ``{extra_key: [(tokens, pages, lock_ref, [children...]), ...]}``.

        Children are sorted by their first unit; empty namespaces are left out.
        """

        def node_tuple(n: TreeNode) -> tuple[Any, ...]:
            return (
                n.tokens,
                list(n.pages),
                n.lock_ref,
                [node_tuple(c) for _, c in sorted(n.children.items())],
            )

        return {
            ek: [node_tuple(c) for _, c in sorted(root.children.items())]
            for ek, root in self._roots.items()
            if root.children
        }

    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant of the tree or its page accounting is broken."""
        seen: set[int] = set()
        locked = num_nodes = 0
        entries = {(prio, node_id) for prio, node_id, n in self._heap if n.id == node_id}
        for ek, root in self._roots.items():
            assert root.is_root and root.extra_key == ek and not root.key and not root.pages, root
            assert root.lock_ref == 0 and root.direct_locks == 0, f"root of {ek!r} is locked"
        for node in self._iter_nodes():
            num_nodes += 1
            parent = node.parent
            assert parent is not None and not node.removed, f"{node!r} is detached but in the tree"
            if node.is_leaf and node.lock_ref == 0:
                assert (self.policy.priority(node), node.id) in entries, f"{node!r}: evictable, not in the heap"
            assert len(node.key) >= 1, f"{node!r} has an empty key"
            assert len(node.key) == len(node.pages) == len(node.hashes), (
                f"{node!r}: units/pages/hashes differ"
            )
            assert all(len(u) == self.page_size for u in node.key), f"{node!r}: unit of wrong size"
            assert parent.children.get(node.key[0]) is node, f"{node!r} not under its first unit"
            assert node.extra_key == parent.extra_key, f"{node!r} in the wrong namespace"
            prev = None if parent.is_root else parent.hashes[-1]
            for unit, h in zip(node.key, node.hashes, strict=True):
                prev = hash_page(prev, unit, node.extra_key)
                assert h == prev, f"{node!r}: stale page hash"
            for p in node.pages:
                assert 1 <= p <= self.allocator.num_pages, f"{node!r}: page {p} out of range"
                assert p not in seen, f"page {p} held twice"
                seen.add(p)
            expect = node.direct_locks + sum(c.lock_ref for c in node.children.values())
            assert node.direct_locks >= 0 and node.lock_ref == expect, (
                f"{node!r}: lock_ref {node.lock_ref} != own {node.direct_locks} + children"
            )
            assert 0 < node.last_access <= self._clock, f"{node!r}: last_access out of clock"
            if node.lock_ref > 0:
                locked += len(node.pages)
        assert self._num_nodes == num_nodes, f"node count {self._num_nodes} != {num_nodes} in tree"
        assert seen == self._cached, f"cached set drifted: {len(seen)} in tree, {len(self._cached)} counted"
        assert locked == self._num_locked, f"locked pages {self._num_locked} counted, {locked} in tree"
        assert self.num_evictable_pages + self.num_locked_pages == self.num_cached_pages
        free_set = getattr(self.allocator, "_free_set", None)  # no public query on PageAllocator yet
        if isinstance(free_set, set):
            both = self._cached & free_set
            assert not both, f"cached pages are on the allocator's free list: {sorted(both)}"
        assert self.num_cached_pages <= self.allocator.num_used, "more pages cached than allocated"

    # ------------------------------------------------------------------ internals

    def _units(self, token_ids: Sequence[int]) -> list[Unit]:
        p = self.page_size
        toks = list(map(int, token_ids))
        return [tuple(toks[i : i + p]) for i in range(0, len(toks) - p + 1, p)]

    def _new_root(self, extra_key: str | None) -> TreeNode:
        return TreeNode(next(self._ids), extra_key, is_root=True)

    def _walk(self, root: TreeNode, units: list[Unit]) -> list[tuple[TreeNode, int]]:
        """Read-only: the nodes along the longest match and how many units of each matched."""
        path: list[tuple[TreeNode, int]] = []
        node, i = root, 0
        while i < len(units):
            child = node.children.get(units[i])
            if child is None:
                break
            m = 1
            while m < len(child.key) and i + m < len(units) and child.key[m] == units[i + m]:
                m += 1
            path.append((child, m))
            i += m
            if m < len(child.key):
                break
            node = child
        return path

    def _descend(self, root: TreeNode, units: list[Unit]) -> tuple[list[TreeNode], list[int]]:
        """Match ``units``, splitting the last node so the path ends exactly at the match."""
        return self._descend_path(self._walk(root, units))

    def _descend_path(self, path: list[tuple[TreeNode, int]]) -> tuple[list[TreeNode], list[int]]:
        """The nodes and pages of a :meth:`_walk` result, splitting its last node if only partly matched."""
        nodes: list[TreeNode] = []
        pages: list[int] = []
        for node, m in path:
            if m < len(node.key):
                node = self._split(node, m)
            nodes.append(node)
            pages.extend(node.pages)
        return nodes, pages

    def _split(self, node: TreeNode, m: int) -> TreeNode:
        """Cut ``node`` after ``m`` units; a new parent takes the head, ``node`` keeps the tail."""
        parent = node.parent
        assert parent is not None and 0 < m < len(node.key)
        head = TreeNode(
            next(self._ids), node.extra_key, parent, node.key[:m], node.pages[:m], node.hashes[:m]
        )
        head.lock_ref = node.lock_ref  # locks below (on node) cover the head too; none are its own
        head.last_access = node.last_access
        head.hit_count = node.hit_count
        parent.children[head.key[0]] = head
        node.key, node.pages, node.hashes = node.key[m:], node.pages[m:], node.hashes[m:]
        node.parent = head
        head.children[node.key[0]] = node
        self._num_nodes += 1
        self._candidate(node)  # its key and pages changed (a policy may read them)
        return head

    def _touch(self, nodes: list[TreeNode], hit: bool) -> None:
        for n in nodes:
            self._clock += 1
            n.last_access = self._clock
            if hit:
                n.hit_count += 1
            self._candidate(n)

    def _candidate(self, node: TreeNode) -> None:
        """Record ``node``'s current priority if it is an evictable leaf now (call after any change
        to its priority, lock or children)."""
        if not node.is_leaf or node.lock_ref or node.removed or node.is_root:
            return
        if len(self._heap) > 4 * self._num_nodes + 64:
            self._rebuild_heap()
        heapq.heappush(self._heap, (self.policy.priority(node), node.id, node))

    def _rebuild_heap(self) -> None:
        """Drop stale entries: one entry per evictable leaf."""
        self._heap = [(self.policy.priority(n), n.id, n) for n in self._iter_nodes() if n.is_leaf and n.lock_ref == 0]
        heapq.heapify(self._heap)

    def _remove_leaf(self, node: TreeNode) -> TreeNode:
        parent = node.parent
        assert parent is not None and node.is_leaf and node.lock_ref == 0
        del parent.children[node.key[0]]
        node.parent = None
        node.removed = True
        self._num_nodes -= 1
        return parent

    def _validate_pages(self, pages: list[int], tree_pages: list[int]) -> None:
        """``pages`` are distinct, in range, and a cached one only where the tree holds it (``tree_pages``)."""
        if len(set(pages)) != len(pages):
            raise ValueError(f"insert got a page id twice: {pages}")
        if pages and not (min(pages) >= 1 and max(pages) <= self.allocator.num_pages):
            bad = next(p for p in pages if not 1 <= p <= self.allocator.num_pages)
            raise ValueError(f"page {bad} out of range 1..{self.allocator.num_pages}")
        for i, p in enumerate(pages):
            if p in self._cached and (i >= len(tree_pages) or tree_pages[i] != p):
                raise ValueError(
                    f"page {p} is held by the cache for other tokens; the caller does not own it"
                )

    def _iter_nodes(self) -> Iterator[TreeNode]:
        """Every non-root node, parents before children."""
        stack = [c for root in self._roots.values() for c in root.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _publish(self, events: list[KVEvent]) -> None:
        if self.publisher is not None:
            self.publisher.publish(events)
