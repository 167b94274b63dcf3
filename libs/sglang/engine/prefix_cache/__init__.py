"""Prefix cache: a page-granular radix tree over KV pages, eviction policies and KV cache events."""

from __future__ import annotations

from sglang.engine.prefix_cache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    InProcessPublisher,
    KVEvent,
    KVEventBatch,
    KVEventPublisher,
    available_publishers,
    create_publisher,
    hash_page,
    hash_pages,
    register_publisher,
)
from sglang.engine.prefix_cache.eviction import (
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    available_policies,
    create_policy,
    register_policy,
)
from sglang.engine.prefix_cache.radix_cache import (
    CacheStats,
    InsertResult,
    MatchResult,
    RadixCache,
    TreeNode,
)

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "CacheStats",
    "EvictionPolicy",
    "InProcessPublisher",
    "InsertResult",
    "KVEvent",
    "KVEventBatch",
    "KVEventPublisher",
    "LFUPolicy",
    "LRUPolicy",
    "MatchResult",
    "RadixCache",
    "TreeNode",
    "available_policies",
    "available_publishers",
    "create_policy",
    "create_publisher",
    "hash_page",
    "hash_pages",
    "register_policy",
    "register_publisher",
]
