"""Eviction policies for the radix prefix cache: an abstract base plus a registry with lazy imports.

A policy only *orders* candidates; the cache decides what is a candidate (an unlocked leaf) and does
the freeing. ``last_access`` is a logical clock that the cache advances once per node touched, so it
is unique per node and every built-in order is total and deterministic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from sglang.utils.registry import LazyRegistry

if TYPE_CHECKING:
    from sglang.engine.prefix_cache.radix_cache import TreeNode


class EvictionPolicy(ABC):
    """Orders evictable leaves: the leaf with the smallest :meth:`priority` is evicted first.

    Contract: ``priority`` is a pure function of the node's bookkeeping fields (``last_access``,
    ``hit_count``, ``key``/``pages``); it must not mutate the node. The cache reads it once per
    candidate per ``evict`` call, during which no node is touched.
    """

    name: ClassVar[str]

    @abstractmethod
    def priority(self, node: TreeNode) -> tuple[int, ...]:
        """Sort key; lower is evicted earlier."""


class LRUPolicy(EvictionPolicy):
    """Least recently used first (smallest ``last_access``)."""

    name = "lru"

    def priority(self, node: TreeNode) -> tuple[int, ...]:
        return (node.last_access,)


class LFUPolicy(EvictionPolicy):
    """Least frequently used first (smallest ``hit_count``), ties broken by least recently used."""

    name = "lfu"

    def priority(self, node: TreeNode) -> tuple[int, ...]:
        return (node.hit_count, node.last_access)


_POLICIES: LazyRegistry[EvictionPolicy] = LazyRegistry(
    "eviction_policy",
    {"lru": "sglang.engine.prefix_cache.eviction:LRUPolicy", "lfu": "sglang.engine.prefix_cache.eviction:LFUPolicy"},
)


def register_policy(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:Class"`` (the module is imported only when the policy is made)."""
    _POLICIES.register(name, target)


def available_policies() -> list[str]:
    return _POLICIES.names()


def create_policy(name: str, **kwargs: Any) -> EvictionPolicy:
    return _POLICIES.create(name, **kwargs)
