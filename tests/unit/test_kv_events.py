"""KV cache events: BlockStored / BlockRemoved / AllBlocksCleared with chained, stable page hashes."""

from __future__ import annotations

import hashlib
import struct

import pytest
from sglang.engine.memory.page_allocator import PageAllocator
from sglang.engine.prefix_cache import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    InProcessPublisher,
    KVEventBatch,
    RadixCache,
    create_publisher,
    hash_page,
    hash_pages,
)

pytestmark = pytest.mark.unit


def ref_hash(parent: int | None, tokens: list[int], extra_key: str | None) -> int:
    """The documented encoding, written out independently of events.py."""
    if parent is None:
        if extra_key is None:
            head = bytes([0, 0])
        else:
            raw = extra_key.encode("utf-8")
            head = bytes([0, 1]) + struct.pack("<I", len(raw)) + raw
    else:
        head = bytes([1]) + struct.pack("<Q", parent)
    body = struct.pack("<I", len(tokens)) + b"".join(struct.pack("<q", t) for t in tokens)
    return int.from_bytes(hashlib.blake2b(head + body, digest_size=8).digest(), "little")


def ref_chain(
    tokens: list[int], page_size: int, extra_key: str | None, parent: int | None = None
) -> list[int]:
    out = []
    for i in range(0, len(tokens) // page_size * page_size, page_size):
        parent = ref_hash(parent, tokens[i : i + page_size], extra_key)
        out.append(parent)
    return out


def make(page_size: int = 2, num_pages: int = 16) -> tuple[PageAllocator, RadixCache, InProcessPublisher]:
    alloc = PageAllocator(num_pages, page_size)
    pub = InProcessPublisher()
    return alloc, RadixCache(alloc, page_size, publisher=pub), pub


def test_hash_functions_match_the_documented_encoding() -> None:
    assert hash_page(None, [1, 2], None) == ref_hash(None, [1, 2], None)
    assert hash_page(None, [1, 2], "lora") == ref_hash(None, [1, 2], "lora")
    assert hash_page(7, [1, 2], "ignored-after-the-first-page") == ref_hash(7, [1, 2], None)
    toks = [5, 6, 7, 8, 9, 10, 11]
    assert hash_pages(toks, 3, "k") == ref_chain(toks, 3, "k")
    assert len(hash_pages(toks, 3)) == 2  # trailing partial page ignored
    # a golden value pins the encoding across releases and processes (not Python's hash())
    assert hash_page(None, [1, 2, 3, 4], None) == ref_hash(None, [1, 2, 3, 4], None) == GOLDEN
    # None, "" and a different key are three namespaces; token order matters
    assert len({hash_page(None, [1], None), hash_page(None, [1], ""), hash_page(None, [1], "x")}) == 3
    assert hash_page(None, [1, 2], None) != hash_page(None, [2, 1], None)


# Computed once from the encoding; a change here breaks every router/worker pair across versions.
GOLDEN = 0x3A3BE9BCCBF79286
GOLDEN_LORA = 0xB1D97A8BEA5C847C


def test_golden_hash_values() -> None:
    assert hash_page(None, [1, 2, 3, 4], None) == GOLDEN
    assert hash_page(None, [1, 2, 3, 4], "lora") == ref_hash(None, [1, 2, 3, 4], "lora") == GOLDEN_LORA


def test_insert_publishes_block_stored_with_chained_hashes() -> None:
    alloc, cache, pub = make(page_size=2)
    a = [1, 2, 3, 4, 5, 6]
    cache.insert(a, alloc.alloc(3))
    ha = ref_chain(a, 2, None)
    assert pub.events == [BlockStored(ha, None, a, 2, None)]

    # only the new suffix is announced, its parent is the last cached page before it
    b = [1, 2, 3, 4, 7, 8, 9, 10]
    m = cache.match_prefix(b)
    r = cache.insert(b, m.pages + alloc.alloc(2))
    assert r.num_new_pages == 2
    hb = ref_chain(b, 2, None)
    assert hb[:2] == ha[:2]
    assert pub.events[1] == BlockStored(hb[2:], ha[1], [7, 8, 9, 10], 2, None)

    # nothing new -> nothing published
    r = cache.insert(a, alloc.alloc(3))
    alloc.free(r.duplicate_pages)
    assert len(pub.events) == 2
    assert [b.seq for b in pub.batches] == [0, 1]
    # the tree's own hashes are the same chain
    assert cache.match_prefix(b).node.hashes == hb[2:]


def test_evict_publishes_block_removed_in_eviction_order() -> None:
    alloc, cache, pub = make(page_size=1)
    cache.insert([1, 2, 3], alloc.alloc(3))
    cache.insert([1, 2, 9], [1, 2] + alloc.alloc(1))
    cache.match_prefix([1, 2, 9])  # (9) now more recent than (3)
    h123 = ref_chain([1, 2, 3], 1, None)
    h9 = ref_hash(h123[1], [9], None)
    pub.drain()
    assert cache.evict(3) == [3, 4, 2]
    assert pub.events == [BlockRemoved([h123[2], h9, h123[1]])]
    assert cache.evict(0) == [] and len(pub.events) == 1  # nothing evicted, nothing published


def test_flush_publishes_all_blocks_cleared() -> None:
    alloc, cache, pub = make()
    r = cache.insert([1, 2], alloc.alloc(1))
    cache.lock(r.node)
    assert not cache.flush()
    assert not any(isinstance(e, AllBlocksCleared) for e in pub.events)
    cache.unlock(r.node)
    assert cache.flush()
    assert pub.events[-1] == AllBlocksCleared()
    assert pub.batches[-1].seq == 1


def test_same_tokens_same_hashes_across_caches_and_extra_key_separates() -> None:
    _, c1, p1 = make(page_size=2)
    a2, c2, p2 = make(page_size=2)
    toks = [3, 1, 4, 1, 5, 9]
    c1.insert(toks, [1, 2, 3])
    c2.insert(toks, [7, 8, 9])  # different page ids, same content
    c2.insert(toks, a2.alloc(3), extra_key="tenant-b")
    e1, e2, e3 = p1.events[0], p2.events[0], p2.events[1]
    assert isinstance(e1, BlockStored) and isinstance(e2, BlockStored) and isinstance(e3, BlockStored)
    assert e1.block_hashes == e2.block_hashes == ref_chain(toks, 2, None)
    assert e3.block_hashes == ref_chain(toks, 2, "tenant-b") and e3.extra_key == "tenant-b"
    assert not set(e3.block_hashes) & set(e1.block_hashes)


def test_in_process_publisher_subscribers_bound_and_seq() -> None:
    pub = InProcessPublisher(maxlen=2)
    got: list[KVEventBatch] = []
    unsubscribe = pub.subscribe(got.append)

    def broken(batch: KVEventBatch) -> None:
        raise RuntimeError("subscriber bug")

    pub.subscribe(broken)  # logged, never propagates
    pub.publish([AllBlocksCleared()])
    pub.publish([])  # empty: no batch, no seq
    pub.publish([BlockRemoved([1])])
    pub.publish([BlockRemoved([2])])
    assert [b.seq for b in got] == [0, 1, 2]
    assert list(got[2]) == [BlockRemoved([2])] and len(got[2]) == 1  # a batch iterates its events
    assert [b.seq for b in pub.batches] == [1, 2]  # bounded: the oldest fell off
    assert pub.events == [BlockRemoved([1]), BlockRemoved([2])]
    unsubscribe()
    pub.publish([BlockRemoved([3])])
    assert len(got) == 3
    assert [b.seq for b in pub.drain()] == [2, 3] and pub.batches == []
    assert isinstance(create_publisher("in_process", maxlen=5), InProcessPublisher)
    with pytest.raises(ValueError, match="unknown KV event publisher"):
        create_publisher("carrier-pigeon")
