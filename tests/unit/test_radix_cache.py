"""Radix prefix cache: exact tree shapes, page ids, duplicates, namespaces, eviction order, locks."""

from __future__ import annotations

import pytest
from sglang.engine.memory.page_allocator import PageAllocator
from sglang.engine.prefix_cache import (
    EvictionPolicy,
    InsertResult,
    RadixCache,
    TreeNode,
    create_policy,
)
from sglang.engine.prefix_cache import eviction as eviction_mod

pytestmark = pytest.mark.unit


def make(num_pages: int = 16, page_size: int = 1, policy: str = "lru") -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages=num_pages, page_size=page_size)
    return alloc, RadixCache(alloc, page_size=page_size, eviction_policy=policy)


def check(alloc: PageAllocator, cache: RadixCache, in_use: int = 0) -> None:
    """Both integrity checks; ``in_use`` = pages the test holds outside the cache."""
    cache.check_integrity()
    alloc.check_integrity(in_use=in_use, cached=cache.num_cached_pages)
    assert alloc.num_free + in_use + cache.num_cached_pages == alloc.num_pages


def put(
    alloc: PageAllocator, cache: RadixCache, tokens: list[int], extra_key: str | None = None
) -> InsertResult:
    """The engine's flow: match, lock, allocate the rest, insert, free duplicates, unlock."""
    m = cache.match_prefix(tokens, extra_key)
    cache.lock(m.node)
    new = alloc.alloc(len(tokens) // cache.page_size - len(m.pages))
    r = cache.insert(tokens[: len(tokens) // cache.page_size * cache.page_size], m.pages + new, extra_key)
    alloc.free(r.duplicate_pages)
    cache.unlock(m.node)
    check(alloc, cache)
    return r


# ----------------------------------------------------------------------------------------- shapes


def test_page_size_1_insert_split_and_match_exact() -> None:
    alloc, cache = make(16, 1)
    r = cache.insert([1, 2, 3, 4, 5], alloc.alloc(5))
    assert (r.pages, r.num_new_pages, r.duplicate_pages) == ([1, 2, 3, 4, 5], 5, [])
    assert r.node.pages == [1, 2, 3, 4, 5]
    assert cache.dump() == {None: [((1, 2, 3, 4, 5), [1, 2, 3, 4, 5], 0, [])]}
    check(alloc, cache)

    m = cache.match_prefix([1, 2, 3, 9, 9])
    assert (m.pages, m.num_tokens, m.node.pages) == ([1, 2, 3], 3, [1, 2, 3])
    # match splits so the node ends exactly at the match
    assert cache.dump() == {None: [((1, 2, 3), [1, 2, 3], 0, [((4, 5), [4, 5], 0, [])])]}
    r = cache.insert([1, 2, 3, 9, 9], m.pages + alloc.alloc(2))
    assert (r.pages, r.num_new_pages, r.duplicate_pages) == ([1, 2, 3, 6, 7], 2, [])
    assert cache.dump() == {
        None: [((1, 2, 3), [1, 2, 3], 0, [((4, 5), [4, 5], 0, []), ((9, 9), [6, 7], 0, [])])]
    }
    check(alloc, cache)

    # an insert ending inside a node splits it and returns the upper part
    fresh = alloc.alloc(2)
    assert fresh == [8, 9]
    r = cache.insert([1, 2], fresh)
    assert (r.pages, r.num_new_pages, r.duplicate_pages) == ([1, 2], 0, [8, 9])
    assert r.node.pages == [1, 2] and r.node.tokens == (1, 2)
    alloc.free(r.duplicate_pages)
    assert cache.dump() == {
        None: [
            ((1, 2), [1, 2], 0, [((3,), [3], 0, [((4, 5), [4, 5], 0, []), ((9, 9), [6, 7], 0, [])])]),
        ]
    }
    check(alloc, cache)

    m = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert (m.pages, m.num_tokens, m.node.pages) == ([1, 2, 3, 4, 5], 5, [4, 5])
    m = cache.match_prefix([7, 1, 2])
    assert (m.pages, m.num_tokens) == ([], 0) and m.node.is_root
    assert cache.match_prefix([]).num_tokens == 0
    check(alloc, cache)


def test_page_size_4_whole_pages_only() -> None:
    alloc, cache = make(16, 4)
    a = list(range(12))
    r = cache.insert(a, alloc.alloc(3))
    assert r.pages == [1, 2, 3]
    assert cache.dump() == {None: [(tuple(range(12)), [1, 2, 3], 0, [])]}

    # a trailing partial page is never matched
    m = cache.match_prefix(a + [99, 100])
    assert (m.pages, m.num_tokens) == ([1, 2, 3], 12)
    assert cache.match_prefix(a[:11]).pages == [1, 2]
    # a mismatch inside the second page matches only the first page: splits happen at page boundaries
    m = cache.match_prefix([0, 1, 2, 3, 4, 5, 6, 99])
    assert (m.pages, m.num_tokens) == ([1], 4)
    assert cache.dump() == {
        None: [((0, 1, 2, 3), [1], 0, [((4, 5, 6, 7), [2], 0, [((8, 9, 10, 11), [3], 0, [])])])]
    }
    check(alloc, cache)

    b = [0, 1, 2, 3, 50, 51, 52, 53, 60, 61, 62, 63]
    r = put(alloc, cache, b)
    assert (r.pages, r.num_new_pages, r.duplicate_pages) == ([1, 4, 5], 2, [])
    assert cache.dump() == {
        None: [
            (
                (0, 1, 2, 3),
                [1],
                0,
                [
                    ((4, 5, 6, 7), [2], 0, [((8, 9, 10, 11), [3], 0, [])]),
                    ((50, 51, 52, 53, 60, 61, 62, 63), [4, 5], 0, []),
                ],
            )
        ]
    }
    assert cache.match_prefix(b + [1, 2, 3]).pages == [1, 4, 5]

    with pytest.raises(ValueError, match="page_size"):
        cache.insert([0, 1, 2], [6])
    with pytest.raises(ValueError, match="page_size"):
        RadixCache(alloc, page_size=2)
    with pytest.raises(ValueError, match="unknown eviction_policy"):
        RadixCache(alloc, page_size=4, eviction_policy="random")
    check(alloc, cache)


# ------------------------------------------------------------------------------------- duplicates


def test_insert_over_cached_prefix_returns_duplicates_and_keeps_tree_pages() -> None:
    alloc, cache = make(16, 2)
    cache.insert([1, 2, 3, 4, 5, 6], alloc.alloc(3))  # pages 1, 2, 3
    # a request that computed the same prefix itself (it did not reuse the match)
    mine = alloc.alloc(4)
    assert mine == [4, 5, 6, 7]
    r = cache.insert([1, 2, 3, 4, 5, 6, 7, 8], mine)
    assert (r.pages, r.num_new_pages, r.duplicate_pages) == ([1, 2, 3, 7], 1, [4, 5, 6])
    check(alloc, cache, in_use=3)  # the duplicates are still the caller's
    alloc.free(r.duplicate_pages)
    check(alloc, cache)
    assert cache.dump() == {None: [((1, 2, 3, 4, 5, 6), [1, 2, 3], 0, [((7, 8), [7], 0, [])])]}

    # shared pages (same id as the tree's) are neither new nor duplicate
    extra = alloc.alloc(1)
    assert extra == [8]
    r = cache.insert([1, 2, 3, 4, 5, 6], [1, 2, extra[0]])
    assert (r.pages, r.num_new_pages, r.duplicate_pages) == ([1, 2, 3], 0, [8])
    alloc.free(r.duplicate_pages)
    check(alloc, cache)


def test_insert_rejects_bad_pages_without_changing_anything() -> None:
    alloc, cache = make(16, 1)
    cache.insert([1, 2, 3], alloc.alloc(3))
    before = cache.dump()
    with pytest.raises(ValueError, match="held by the cache"):
        cache.insert([9, 9], [1, 4])  # page 1 belongs to tokens [1]
    with pytest.raises(ValueError, match="held by the cache"):
        cache.insert([1, 2, 3], [2, 1, 3])
    with pytest.raises(ValueError, match="twice"):
        cache.insert([5, 6], [4, 4])
    with pytest.raises(ValueError, match="out of range"):
        cache.insert([5], [0])
    with pytest.raises(ValueError, match="out of range"):
        cache.insert([5], [17])
    assert cache.dump() == before
    check(alloc, cache)


def _access_order(cache: RadixCache) -> list[tuple[tuple[int, ...], int]]:
    """Every node's tokens and ``last_access``: the LRU state an insert leaves behind."""
    out: list[tuple[tuple[int, ...], int]] = []
    stack = [c for root in cache._roots.values() for c in root.children.values()]
    while stack:
        node = stack.pop()
        out.append((node.tokens, node.last_access))
        stack.extend(node.children.values())
    return sorted(out)


def test_insert_after_a_node_equals_a_full_insert() -> None:
    """A request that grew past its locked node inserts only the continuation (``after=``): the
    tree, the page ids, the duplicates, the touched nodes' ``last_access`` and the published events
    are those of inserting the whole sequence from the root."""
    results = []
    for incremental in (False, True):
        alloc, cache = make(32, 2)
        cache.insert([7, 7, 8, 8], alloc.alloc(2))  # another prefix: pages 1, 2
        head = cache.insert([1, 2, 3, 4], alloc.alloc(2))  # pages 3, 4
        cache.lock(head.node)
        other = cache.insert([1, 2, 3, 4, 5, 6, 9, 9], [3, 4, *alloc.alloc(2)])  # pages 5, 6: splits nothing yet
        mine = alloc.alloc(3)  # pages 7, 8, 9: [5, 6] duplicates other's page 5
        tail = [5, 6, 10, 10, 11, 11]
        if incremental:
            r = cache.insert(tail, mine, after=head.node)
        else:
            full = cache.insert([1, 2, 3, 4, *tail], [3, 4, *mine])
            r = InsertResult(full.pages[2:], full.node, full.num_new_pages, full.duplicate_pages)
        assert (r.pages, r.num_new_pages, r.duplicate_pages) == ([5, 8, 9], 2, [7])
        assert head.node.tokens[-2:] == (3, 4) and not head.node.removed  # the split kept its end
        alloc.free(r.duplicate_pages)
        cache.unlock(head.node)
        check(alloc, cache)
        assert other.num_new_pages == 2
        results.append((cache.dump(), _access_order(cache), r.node.tokens))
    assert results[0] == results[1]


def test_insert_after_rejects_a_foreign_node_without_changing_anything() -> None:
    alloc, cache = make(16, 1)
    r = cache.insert([1, 2], alloc.alloc(2))
    keyed = cache.insert([1, 2], alloc.alloc(2), extra_key="lora-a")
    before = cache.dump()
    with pytest.raises(ValueError, match="not a node of this tree under extra_key None"):
        cache.insert([3], alloc.alloc(1), after=keyed.node)
    with pytest.raises(ValueError, match="held by the cache"):
        cache.insert([3], [1], after=r.node)  # page 1 holds token 1, not the continuation's 3
    assert cache.dump() == before
    assert cache.flush()
    with pytest.raises(ValueError, match="not a node of this tree"):
        cache.insert([3], [5], after=r.node)  # removed by the flush
    assert cache.dump() == {}


# ------------------------------------------------------------------------------------- namespaces


def test_extra_key_namespaces_never_match_each_other() -> None:
    alloc, cache = make(16, 1)
    assert cache.insert([1, 2, 3], alloc.alloc(3)).pages == [1, 2, 3]
    r = cache.insert([1, 2, 3], alloc.alloc(3), extra_key="lora-a")
    assert (r.pages, r.num_new_pages, r.duplicate_pages) == ([4, 5, 6], 3, [])
    assert cache.match_prefix([1, 2, 3], "lora-a").pages == [4, 5, 6]
    assert cache.match_prefix([1, 2, 3]).pages == [1, 2, 3]
    m = cache.match_prefix([1, 2, 3], "lora-b")
    assert (m.pages, m.num_tokens) == ([], 0) and m.node.is_root
    assert m.node.extra_key == "lora-b"
    assert cache.dump() == {
        None: [((1, 2, 3), [1, 2, 3], 0, [])],
        "lora-a": [((1, 2, 3), [4, 5, 6], 0, [])],
    }
    check(alloc, cache)
    # evicting a namespace empty removes it from the tree
    assert sorted(cache.evict(6)) == [1, 2, 3, 4, 5, 6]
    assert cache.dump() == {}
    check(alloc, cache)


# --------------------------------------------------------------------------------------- eviction


def _three_leaves(policy: str) -> tuple[PageAllocator, RadixCache]:
    """A=[10,11] p1,2  B=[20,21] p3,4  C=[30,31] p5,6. A hit 3x early, C then B once each later."""
    alloc, cache = make(16, 1, policy)
    for toks in ([10, 11], [20, 21], [30, 31]):
        put(alloc, cache, toks)
    for toks in ([10, 11], [10, 11], [10, 11], [30, 31], [20, 21]):
        cache.match_prefix(toks)
    return alloc, cache


def test_lru_eviction_order_exact() -> None:
    alloc, cache = _three_leaves("lru")
    assert cache.evict(6) == [2, 1, 6, 5, 4, 3]
    assert cache.stats.num_evictions == 6
    check(alloc, cache)


def test_lfu_eviction_order_exact() -> None:
    alloc, cache = _three_leaves("lfu")
    # hit counts A=3 (put's own match does not hit: nothing was cached yet), B=1, C=1; C older than B
    assert cache.evict(6) == [6, 5, 4, 3, 2, 1]
    check(alloc, cache)


def test_partial_eviction_takes_tail_first_and_keeps_priority() -> None:
    alloc, cache = _three_leaves("lru")
    assert cache.evict(1) == [2]
    assert cache.dump()[None][0] == ((10,), [1], 0, [])
    check(alloc, cache)
    assert cache.evict(2) == [1, 6]
    assert cache.dump() == {None: [((20, 21), [3, 4], 0, []), ((30,), [5], 0, [])]}
    assert cache.evict(0) == []
    assert cache.stats.num_evictions == 3
    check(alloc, cache)


def test_parent_becomes_leaf_and_competes_with_its_own_priority() -> None:
    alloc, cache = make(16, 1)
    put(alloc, cache, [1, 2, 3])  # pages 1,2,3
    put(alloc, cache, [1, 2, 4])  # splits: (1,2) p1,2 -> (3) p3, (4) p4
    put(alloc, cache, [7])  # p5, the most recent
    assert cache.dump() == {
        None: [((1, 2), [1, 2], 0, [((3,), [3], 0, []), ((4,), [4], 0, [])]), ((7,), [5], 0, [])]
    }
    # (3) is oldest, then (4); then the parent (1,2), now a leaf, is older than (7)
    assert cache.evict(4) == [3, 4, 2, 1]
    assert cache.dump() == {None: [((7,), [5], 0, [])]}
    check(alloc, cache)


def test_custom_policy_through_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(eviction_mod._POLICIES._entries, "mru", f"{__name__}:MRUPolicy")
    assert isinstance(create_policy("mru"), MRUPolicy)
    alloc, cache = _three_leaves("mru")
    assert cache.evict(6) == [4, 3, 6, 5, 2, 1]  # most recent first: B, C, A
    check(alloc, cache)


class MRUPolicy(EvictionPolicy):
    name = "mru"

    def priority(self, node: TreeNode) -> tuple[int, ...]:
        return (-node.last_access,)


# ------------------------------------------------------------------------------------------ locks


def test_locked_nodes_never_evicted_then_unlock() -> None:
    alloc, cache = make(16, 1)
    put(alloc, cache, [1, 2, 3])
    put(alloc, cache, [1, 2, 4])
    m = cache.match_prefix([1, 2, 4])
    assert m.pages == [1, 2, 4]
    cache.lock(m.node)
    assert (cache.num_cached_pages, cache.num_locked_pages, cache.num_evictable_pages) == (4, 3, 1)
    check(alloc, cache)

    assert cache.evict(100) == [3]  # asked for everything: only the unlocked leaf goes
    assert cache.dump() == {None: [((1, 2), [1, 2], 1, [((4,), [4], 1, [])])]}
    assert cache.evict(100) == []
    assert not cache.flush()
    assert cache.dump() == {None: [((1, 2), [1, 2], 1, [((4,), [4], 1, [])])]}
    check(alloc, cache)

    cache.unlock(m.node)
    assert (cache.num_locked_pages, cache.num_evictable_pages) == (0, 3)
    with pytest.raises(ValueError, match="without a matching lock"):
        cache.unlock(m.node)
    assert cache.evict(100) == [4, 2, 1]
    with pytest.raises(ValueError, match="evicted"):
        cache.lock(m.node)
    check(alloc, cache)


def test_lock_survives_split_and_counts_ancestors() -> None:
    alloc, cache = make(16, 1)
    r = put(alloc, cache, [1, 2, 3, 4])
    node = r.node
    cache.lock(node)
    cache.lock(node)
    put(alloc, cache, [1, 2, 9])  # splits the locked node: the head gets the locks' count
    assert cache.dump() == {None: [((1, 2), [1, 2], 2, [((3, 4), [3, 4], 2, []), ((9,), [5], 0, [])])]}
    assert node.tokens == (3, 4)  # the locked object still ends where it did
    assert cache.num_locked_pages == 4
    # locking the head directly adds to the head only
    head = cache.match_prefix([1, 2]).node
    cache.lock(head)
    assert cache.dump()[None][0][2] == 3
    with pytest.raises(ValueError):
        cache.unlock(cache.match_prefix([1, 2, 9]).node)  # never locked
    cache.unlock(node)
    cache.unlock(head)
    cache.unlock(node)
    assert cache.dump() == {None: [((1, 2), [1, 2], 0, [((3, 4), [3, 4], 0, []), ((9,), [5], 0, [])])]}
    assert cache.num_locked_pages == 0
    check(alloc, cache)
    # a root lock is a no-op
    root = cache.match_prefix([42]).node
    cache.lock(root)
    cache.unlock(root)
    cache.unlock(root)
    check(alloc, cache)


def test_flush_refused_while_locked_then_frees_everything() -> None:
    alloc, cache = make(8, 2)
    r = put(alloc, cache, [1, 2, 3, 4])
    put(alloc, cache, [5, 6], extra_key="x")
    cache.lock(r.node)
    before = cache.dump()
    assert cache.flush() is False
    assert cache.dump() == before and cache.num_cached_pages == 3
    check(alloc, cache)
    cache.unlock(r.node)
    assert cache.flush() is True
    assert cache.dump() == {} and cache.num_cached_pages == 0
    assert alloc.num_free == 8
    assert cache.match_prefix([1, 2, 3, 4]).num_tokens == 0
    check(alloc, cache)
    assert put(alloc, cache, [1, 2]).num_new_pages == 1


def test_integrity_detects_corruption() -> None:
    alloc, cache = make(8, 1)
    r = put(alloc, cache, [1, 2, 3])
    r.node.lock_ref = 5
    with pytest.raises(AssertionError, match="lock_ref"):
        cache.check_integrity()
    r.node.lock_ref = 0
    alloc.free([2])  # someone freed a page the tree owns
    with pytest.raises(AssertionError, match="free list"):
        cache.check_integrity()


# ------------------------------------------------------------------------------------------ stats


def test_stats_and_hit_rate() -> None:
    alloc, cache = make(16, 2)
    assert cache.stats.hit_rate == 0.0
    tail = put(alloc, cache, [1, 2, 3, 4, 5, 6]).node  # its match: 6 asked, 0 hit
    assert (cache.stats.num_query_tokens, cache.stats.num_hit_tokens) == (6, 0)
    cache.match_prefix([1, 2, 3, 4, 9])  # 5 asked, 4 hit
    cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9])  # 9 asked, 6 hit
    assert (cache.stats.num_query_tokens, cache.stats.num_hit_tokens) == (20, 10)
    assert cache.stats.hit_rate == pytest.approx(0.5)
    assert cache.hit_rate == pytest.approx(0.5)
    # peek: same length as a match, but no stats, no split, no touch
    before = (cache.dump(), tail.tokens, tail.last_access, tail.hit_count)
    assert tail.tokens == (5, 6) and tail.hit_count == 1
    assert cache.peek_prefix_len([1, 2, 3, 4, 5, 6, 7]) == 6
    assert cache.peek_prefix_len([1, 2, 3]) == 2
    assert cache.peek_prefix_len([1, 2], extra_key="other") == 0
    assert (cache.dump(), tail.tokens, tail.last_access, tail.hit_count) == before
    assert cache.stats.num_query_tokens == 20
    assert cache.evict(2) == [3, 2]
    assert cache.stats.num_evictions == 2
    assert cache.flush()
    assert cache.stats.num_evictions == cache.num_evictions == 2  # flush is not eviction
    check(alloc, cache)
