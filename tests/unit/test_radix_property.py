"""Radix prefix cache against a reference model, driven by hypothesis' stateful testing.

The reference is a dict from ``(extra_key, page-aligned token prefix)`` to the page that holds the
prefix's last page. Operations mimic the engine: match, lock, allocate the rest (evicting when
short), insert, free duplicates, unlock, optionally keep the result locked like a running request.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sglang.engine.memory.page_allocator import PageAllocator
from sglang.engine.prefix_cache import RadixCache, TreeNode

pytestmark = pytest.mark.unit

NUM_PAGES = 24
TOKENS = st.lists(st.integers(0, 2), max_size=12)  # tiny alphabet: prefixes are shared a lot
LONG_TOKENS = st.lists(st.integers(0, 1), min_size=12, max_size=40)
EXTRA_KEYS = st.sampled_from([None, "a"])

Key = tuple[str | None, tuple[int, ...]]


def full_scan_eviction(cache: RadixCache, n: int) -> list[int]:
    """The pages ``cache.evict(n)`` must free, in order, computed without changing the cache: every
    unlocked leaf in policy order, a leaf's last page first, a parent joining the candidates once
    its children are gone (the cache keeps its candidates in a heap across calls instead)."""
    heap = [(cache.policy.priority(x), x.id, x) for x in cache._iter_nodes() if x.is_leaf and x.lock_ref == 0]
    heapq.heapify(heap)
    gone: set[int] = set()
    freed: list[int] = []
    while heap and len(freed) < n:
        _, _, node = heapq.heappop(heap)
        take = min(n - len(freed), len(node.pages))
        freed.extend(reversed(node.pages[-take:]))
        if take < len(node.pages):
            break
        gone.add(node.id)
        parent = node.parent
        assert parent is not None
        if not parent.is_root and parent.lock_ref == 0 and all(c.id in gone for c in parent.children.values()):
            heapq.heappush(heap, (cache.policy.priority(parent), parent.id, parent))
    return freed


class RadixMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.page_size = 1
        self.alloc: PageAllocator | None = None
        self.cache: RadixCache | None = None
        self.model: dict[Key, int] = {}  # cached page-aligned prefix -> page of its last page
        self.owner: dict[int, Key] = {}  # the reverse
        self.held: list[tuple[TreeNode, list[int]]] = []  # locks kept across steps and what they pin

    @initialize(page_size=st.sampled_from([1, 2, 3]), policy=st.sampled_from(["lru", "lfu"]))
    def setup(self, page_size: int, policy: str) -> None:
        self.page_size = page_size
        self.alloc = PageAllocator(NUM_PAGES, page_size)
        self.cache = RadixCache(self.alloc, page_size, eviction_policy=policy)

    # ------------------------------------------------------------------ reference helpers

    def _c(self) -> tuple[PageAllocator, RadixCache]:
        assert self.alloc is not None and self.cache is not None
        return self.alloc, self.cache

    def ref_match(self, tokens: list[int], ek: str | None) -> list[int]:
        pages = []
        for k in range(1, len(tokens) // self.page_size + 1):
            key = (ek, tuple(tokens[: k * self.page_size]))
            if key not in self.model:
                break
            pages.append(self.model[key])
        return pages

    def locked_pages(self, extra: Sequence[int] = ()) -> set[int]:
        return {p for _, pages in self.held for p in pages} | set(extra)

    def do_evict(self, n: int, transient: list[int]) -> list[int]:
        _, cache = self._c()
        locked = self.locked_pages(transient)
        expected = full_scan_eviction(cache, n)
        freed = cache.evict(n)
        assert freed == expected, "eviction order differs from a full scan of the tree"
        assert len(freed) == min(max(n, 0), len(self.model) - len(locked))
        assert not set(freed) & locked, "a locked page was evicted"
        for p in freed:
            ek, toks = self.owner.pop(p)
            del self.model[(ek, toks)]
            # deepest first: nothing that extends this prefix may still be cached
            assert not any(
                k[0] == ek and len(k[1]) > len(toks) and k[1][: len(toks)] == toks for k in self.model
            )
        return freed

    # ------------------------------------------------------------------ rules

    @rule(tokens=TOKENS, ek=EXTRA_KEYS, reuse=st.booleans(), keep=st.booleans())
    def insert(self, tokens: list[int], ek: str | None, reuse: bool, keep: bool) -> None:
        self.serve(tokens, ek, reuse, keep)

    @rule(tokens=LONG_TOKENS, ek=EXTRA_KEYS, reuse=st.booleans())
    def insert_long(self, tokens: list[int], ek: str | None, reuse: bool) -> None:
        self.serve(tokens, ek, reuse, keep=False)  # long prompts: memory pressure, eviction inside insert

    def serve(self, tokens: list[int], ek: str | None, reuse: bool, keep: bool) -> None:
        """One request the engine's way: match, lock, allocate (evicting if short), insert, free dups."""
        alloc, cache = self._c()
        n = len(tokens) // self.page_size
        tokens = tokens[: n * self.page_size]
        m = cache.match_prefix(tokens, ek)
        assert m.pages == self.ref_match(tokens, ek)
        assert m.num_tokens == len(m.pages) * self.page_size
        cache.lock(m.node)
        prefix = list(m.pages) if reuse else []
        need = n - len(prefix)
        if need > alloc.num_free:
            self.do_evict(need - alloc.num_free, transient=m.pages)
        if need > alloc.num_free:
            cache.unlock(m.node)
            return
        before = self.ref_match(tokens, ek)
        assert before == m.pages  # the locked match survived the eviction
        caller = prefix + alloc.alloc(need)
        r = cache.insert(tokens, caller, ek)
        assert r.pages == before + caller[len(before) :]
        assert r.duplicate_pages == [c for c, t in zip(caller, before, strict=False) if c != t]
        assert r.num_new_pages == n - len(before)
        for k in range(len(before), n):
            key = (ek, tuple(tokens[: (k + 1) * self.page_size]))
            self.model[key] = caller[k]
            self.owner[caller[k]] = key
        alloc.free(r.duplicate_pages)
        if keep and n:
            cache.lock(r.node)
            self.held.append((r.node, r.pages))
        cache.unlock(m.node)

    @rule(tokens=TOKENS, ek=EXTRA_KEYS)
    def match(self, tokens: list[int], ek: str | None) -> None:
        _, cache = self._c()
        assert cache.peek_prefix_len(tokens, ek) == len(self.ref_match(tokens, ek)) * self.page_size
        m = cache.match_prefix(tokens, ek)
        assert m.pages == self.ref_match(tokens, ek)
        assert m.num_tokens == len(m.pages) * self.page_size
        assert m.node.is_root == (not m.pages)

    @rule(tokens=TOKENS, ek=EXTRA_KEYS)
    def match_and_hold(self, tokens: list[int], ek: str | None) -> None:
        _, cache = self._c()
        m = cache.match_prefix(tokens, ek)
        assert m.pages == self.ref_match(tokens, ek)
        if m.pages:
            cache.lock(m.node)
            self.held.append((m.node, m.pages))

    @precondition(lambda self: bool(self.held))
    @rule(i=st.integers(0, 1000))
    def release(self, i: int) -> None:
        _, cache = self._c()
        node, _ = self.held.pop(i % len(self.held))
        cache.unlock(node)

    @rule(n=st.integers(-1, 30))
    def evict(self, n: int) -> None:
        self.do_evict(n, transient=[])

    @precondition(lambda self: len(self.model) >= NUM_PAGES // 2)  # rare and on a full tree
    @rule()
    def flush(self) -> None:
        _, cache = self._c()
        done = cache.flush()
        assert done == (not self.held)
        if done:
            self.model.clear()
            self.owner.clear()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def consistent(self) -> None:
        if self.cache is None:
            return
        alloc, cache = self._c()
        cache.check_integrity()
        alloc.check_integrity(in_use=0, cached=cache.num_cached_pages)
        assert cache.num_cached_pages == len(self.model)
        locked = self.locked_pages()
        assert cache.num_locked_pages == len(locked)
        assert cache.num_evictable_pages == len(self.model) - len(locked)
        assert locked <= set(self.owner), "a held prefix lost a page"

    def teardown(self) -> None:
        if self.cache is None:
            return
        alloc, cache = self._c()
        for node, _ in self.held:
            cache.unlock(node)
        assert cache.num_locked_pages == 0
        assert cache.flush()
        assert alloc.num_free == NUM_PAGES
        cache.check_integrity()


RadixMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_radix_cache_matches_reference = RadixMachine.TestCase
