"""Cache-aware routing, SGLang gateway semantics, on token ids.

For each request, with ``load`` = a worker's running + waiting requests plus this router's in-flight
requests to it:

1. Imbalanced load: when ``max_load - min_load > balance_abs_threshold`` and
   ``max_load > balance_rel_threshold * min_load``, the least loaded worker (decision ``imbalanced``).
2. Otherwise the worker whose index holds the longest prefix of the prompt, when
   ``matched / prompt tokens > cache_threshold`` (decision ``cache_hit``; ties: lower load, then id).
3. Otherwise the least loaded worker (decision ``cache_miss``). Ties go to the smallest tree (as
   SGLang's "smallest tenant"), then the lowest id. The shared index does not track tree sizes: there
   ties go to the highest rendezvous hash of (prompt, worker id), which spreads new prefixes over
   workers the same way in every router replica.

In every case the prompt is then inserted into the chosen worker's index, so the next request with
the same prefix follows it. The index is a local tree per worker (:class:`LocalTreeIndex`) or, with
``shared_index``, Redis (:class:`sglang.cluster.prefix_index.SharedPrefixIndex`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from sglang_router.policies.base import RoutingPolicy, Selection, WorkerView


class PrefixIndex(Protocol):
    async def match(self, tokens: Sequence[int], worker_ids: Sequence[str]) -> dict[str, int]: ...

    async def insert(self, tokens: Sequence[int], worker_id: str) -> None: ...

    def tree_size(self, worker_id: str) -> int | None: ...

    def remove_worker(self, worker_id: str) -> None: ...

    async def close(self) -> None: ...


def rendezvous_score(tokens: Sequence[int], worker_id: str) -> int:
    """Highest-random-weight hash of (prompt, worker): the same in every process."""
    h = hashlib.blake2b(worker_id.encode(), digest_size=8)
    h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
    return int.from_bytes(h.digest(), "little")


class CacheAwarePolicy(RoutingPolicy):
    name = "cache_aware"

    def __init__(
        self,
        index: PrefixIndex,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        cache_threshold: float = 0.3,
        max_match_tokens: int | None = None,
    ) -> None:
        self.index = index
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.cache_threshold = cache_threshold
        self.max_match_tokens = max_match_tokens  # the index cannot match past this many tokens

    def is_imbalanced(self, workers: Sequence[WorkerView]) -> bool:
        loads = [w.load for w in workers]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo

    async def select(self, workers: Sequence[WorkerView], tokens: Sequence[int]) -> Selection:
        if not workers:
            raise ValueError("no workers to select from")
        if self.is_imbalanced(workers):
            chosen, decision = min(workers, key=lambda w: (w.load, w.worker_id)), "imbalanced"
        else:
            matched = await self.index.match(tokens, [w.worker_id for w in workers])
            best = min(workers, key=lambda w: (-matched.get(w.worker_id, 0), w.load, w.worker_id))
            denom = len(tokens) if self.max_match_tokens is None else min(len(tokens), self.max_match_tokens)
            rate = matched.get(best.worker_id, 0) / denom if denom else 0.0
            if rate > self.cache_threshold:
                chosen, decision = best, "cache_hit"
            else:
                chosen, decision = min(workers, key=lambda w: self._miss_key(w, tokens)), "cache_miss"
        await self.index.insert(tokens, chosen.worker_id)
        return Selection(chosen, decision)

    def _miss_key(self, w: WorkerView, tokens: Sequence[int]) -> tuple[int, int, str]:
        size = self.index.tree_size(w.worker_id)
        if size is None:
            return (w.load, -rendezvous_score(tokens, w.worker_id), w.worker_id)
        return (w.load, size, w.worker_id)

    def remove_worker(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)

    async def close(self) -> None:
        await self.index.close()
