"""Shared prefix index in Redis: which worker was sent which prompt prefix, for router replicas.

The prompt is cut into pages of ``page_size`` tokens (a partial last page is ignored). Page ``i`` is
named by a chained hash ``h_i = blake2b(h_{i-1} || tokens of page i)``, so a page hash names the
whole prefix up to and including that page, as in vLLM's and Dynamo's KV block hashes. Keys:

    {prefix}:pidx:page:{h_i}   hash   worker_id -> last routed (µs)    (expires ttl_s after a touch)
    {prefix}:pidx:lru          zset   "{h_i}|{worker_id}" scored by last routed (µs) - i

``insert`` records that a worker was sent the prompt (all its pages). ``match`` returns, per worker,
how many leading tokens of a prompt were recorded for it: the pages from the first one on that all
name that worker. The zset bounds the index: past ``max_entries`` (page, worker) entries, the least
recently routed go first, and within one prompt the deepest pages first (``- i``), so that eviction
shortens prefixes instead of breaking them. Several routers updating concurrently may over-evict a little; the index
is a routing hint, never a correctness matter.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

HASH_BYTES = 8


def page_hashes(tokens: Sequence[int], page_size: int, max_pages: int | None = None) -> list[str]:
    """Chained hex hashes of the full pages of ``tokens`` (at most ``max_pages``)."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    num_pages = len(tokens) // page_size
    if max_pages is not None:
        num_pages = min(num_pages, max_pages)
    out: list[str] = []
    prev = b""
    for p in range(num_pages):
        page = tokens[p * page_size : (p + 1) * page_size]
        h = hashlib.blake2b(prev, digest_size=HASH_BYTES)
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in page))
        prev = h.digest()
        out.append(prev.hex())
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedPrefixIndex:
    """Prefix -> workers map shared by router replicas through Redis.

    Contract: ``match`` and ``insert`` cost one Redis round trip each (``insert`` a second one when it
    has to evict). Matches are multiples of ``page_size`` and cover at most ``max_pages`` pages.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "sglang",
        page_size: int = 16,
        max_entries: int = 1_000_000,
        ttl_s: float = 3600.0,
        max_pages: int = 512,
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.page_size = page_size
        self.max_entries = max_entries
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.max_pages = max_pages

    def _page_key(self, h: str) -> str:
        return f"{self.prefix}:pidx:page:{h}"

    @property
    def _lru_key(self) -> str:
        return f"{self.prefix}:pidx:lru"

    @property
    def max_match_tokens(self) -> int:
        """Longest prefix the index can report (match rates are measured against at most this)."""
        return self.page_size * self.max_pages

    async def match(self, tokens: Sequence[int], worker_ids: Sequence[str]) -> dict[str, int]:
        matched = dict.fromkeys(worker_ids, 0)
        hashes = page_hashes(tokens, self.page_size, self.max_pages)
        if not hashes or not worker_ids:
            return matched
        async with self.redis.pipeline(transaction=False) as p:
            for h in hashes:
                p.hkeys(self._page_key(h))
            pages = await p.execute()
        alive = set(worker_ids)
        for i, holders in enumerate(pages):
            alive &= {_text(w) for w in holders}
            if not alive:
                break
            for w in alive:
                matched[w] = (i + 1) * self.page_size
        return matched

    async def insert(self, tokens: Sequence[int], worker_id: str) -> None:
        hashes = page_hashes(tokens, self.page_size, self.max_pages)
        if not hashes:
            return
        now = time.time_ns() // 1000
        async with self.redis.pipeline(transaction=False) as p:
            for h in hashes:
                key = self._page_key(h)
                p.hset(key, worker_id, now)
                p.pexpire(key, self.ttl_ms)
            p.zadd(self._lru_key, {f"{h}|{worker_id}": now - i for i, h in enumerate(hashes)})
            p.pexpire(self._lru_key, self.ttl_ms)
            p.zcard(self._lru_key)
            results = await p.execute()
        excess = int(results[-1]) - self.max_entries
        if excess > 0:
            await self._evict(excess)

    async def _evict(self, count: int) -> None:
        popped: list[tuple[Any, float]] = await self.redis.zpopmin(self._lru_key, count)  # type: ignore[assignment]
        if not popped:
            return
        async with self.redis.pipeline(transaction=False) as p:
            for member, _score in popped:
                h, _, worker = _text(member).partition("|")
                p.hdel(self._page_key(h), worker)
            await p.execute()

    async def num_entries(self) -> int:
        return int(await self.redis.zcard(self._lru_key))

    async def clear(self) -> None:
        """Delete the whole index (tests, or after a model change)."""
        keys = [k async for k in self.redis.scan_iter(match=f"{self.prefix}:pidx:*", count=1000)]
        if keys:
            await self.redis.delete(*keys)

    def tree_size(self, worker_id: str) -> int | None:
        """Not tracked in the shared index (policies fall back to other tie-breakers)."""
        return None

    def remove_worker(self, worker_id: str) -> None:
        """Entries of a gone worker are filtered at match time and age out; nothing to do here."""

    async def close(self) -> None:
        """The Redis client belongs to the caller."""
