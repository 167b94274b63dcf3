"""Routing policies: an abstract base plus a registry with lazy imports.

``create_policy(settings, redis)`` builds the policy that ``settings.policy`` names; a policy module
is imported only when it is used. Add a policy by writing a module with a ``RoutingPolicy`` subclass
and one line in ``POLICIES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglang.utils.registry import LazyRegistry

from sglang_router.policies.base import RoutingPolicy, Selection, WorkerView

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from sglang.settings.router import RouterSettings

POLICIES: LazyRegistry[RoutingPolicy] = LazyRegistry(
    "routing policy",
    {
        "round_robin": "sglang_router.policies.round_robin:RoundRobinPolicy",
        "power_of_two": "sglang_router.policies.power_of_two:PowerOfTwoPolicy",
        "cache_aware": "sglang_router.policies.cache_aware:CacheAwarePolicy",
    },
)

__all__ = ["POLICIES", "RoutingPolicy", "Selection", "WorkerView", "create_policy", "policy_class"]


def policy_class(name: str) -> type[RoutingPolicy]:
    return POLICIES.load(name)


def create_policy(settings: RouterSettings, redis: aioredis.Redis | None = None) -> RoutingPolicy:
    """The policy named by ``settings.policy``, configured from ``settings``. ``redis`` is needed for
    ``cache_aware`` with ``shared_index``."""
    cls = policy_class(settings.policy)
    if settings.policy == "power_of_two":
        return cls(seed=settings.seed)  # type: ignore[call-arg]
    if settings.policy != "cache_aware":
        return cls()
    index: Any
    max_match: int | None = None
    if settings.shared_index:
        from sglang.cluster.prefix_index import SharedPrefixIndex

        if redis is None:
            raise ValueError("shared_index needs a Redis client")
        index = SharedPrefixIndex(
            redis,
            prefix=settings.redis_prefix,
            page_size=settings.shared_index_page_size,
            max_entries=settings.shared_index_max_entries,
            ttl_s=settings.shared_index_ttl_s,
        )
        max_match = index.max_match_tokens
    else:
        from sglang_router.policies.radix_tree import LocalTreeIndex

        index = LocalTreeIndex(settings.max_tree_size)
    return cls(  # type: ignore[call-arg]
        index,
        balance_abs_threshold=settings.balance_abs_threshold,
        balance_rel_threshold=settings.balance_rel_threshold,
        cache_threshold=settings.cache_threshold,
        max_match_tokens=max_match,
    )
