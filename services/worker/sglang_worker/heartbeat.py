"""Keeps this worker's record in the Redis registry (``sglang.cluster.registry``).

Every ``interval_s`` the record is rewritten with the latest load and a fresh TTL; when heartbeats
stop (crash, SIGKILL), the record expires within the TTL. Draining is explicit: :meth:`drain`
writes ``draining=True`` at once (routers stop picking this worker), :meth:`deregister` deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from sglang.cluster.registry import WorkerLoad, WorkerRecord, WorkerRegistry

logger = logging.getLogger(__name__)


class Heartbeat:
    """Contract: :meth:`run` beats until ``stop`` is set and then returns without deregistering
    (the owner calls :meth:`deregister` once in-flight work is done). Redis errors are logged and
    retried on the next beat; they never end the loop."""

    def __init__(
        self, registry: WorkerRegistry, record: WorkerRecord, load: Callable[[], WorkerLoad], interval_s: float
    ) -> None:
        self.registry = registry
        self.record = record
        self.load = load
        self.interval_s = interval_s
        self._lock = asyncio.Lock()  # one write at a time, so a late beat cannot undo draining
        self._deregistered = False

    async def beat(self) -> bool:
        async with self._lock:
            if self._deregistered:
                return False
            self.record.load = self.load()
            try:
                await self.registry.heartbeat(self.record)
                return True
            except (aioredis.RedisError, OSError) as e:
                logger.warning("registry heartbeat for %s failed: %s", self.record.worker_id, e)
                return False

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.beat()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def drain(self) -> None:
        """Mark the record draining now (and in every later beat)."""
        self.record.draining = True
        await self.beat()

    async def deregister(self) -> None:
        async with self._lock:
            self._deregistered = True
            try:
                await self.registry.deregister(self.record.worker_id)
            except (aioredis.RedisError, OSError) as e:
                logger.warning("deregistering %s failed (its record expires by TTL): %s", self.record.worker_id, e)
