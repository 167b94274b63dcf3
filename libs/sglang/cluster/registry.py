"""Worker registry in Redis.

Each worker writes its record as JSON under ``{prefix}:worker:{worker_id}`` with a TTL and
refreshes it every heartbeat; the id is also in the set ``{prefix}:workers``. A worker whose
heartbeat lapses disappears when its key expires: readers drop ids whose key is gone. On SIGTERM a
worker first re-registers with ``draining=True`` (routers stop sending new work), then deletes
its record.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis


@dataclass
class WorkerLoad:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    token_usage: float = 0.0
    cache_hit_rate: float = 0.0
    num_cached_pages: int = 0
    max_running_requests: int = 0


@dataclass
class WorkerRecord:
    worker_id: str
    grpc_addr: str  # host:port of the Worker gRPC service
    role: str = "unified"  # unified | prefill | decode
    model: str = ""  # served model name (what clients pass as "model")
    model_path: str = ""
    context_length: int = 0
    page_size: int = 0
    metrics_addr: str = ""  # host:port of /metrics, when served
    draining: bool = False
    started_at: float = field(default_factory=time.time)
    heartbeat_at: float = field(default_factory=time.time)
    load: WorkerLoad = field(default_factory=WorkerLoad)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerRecord:
        d: dict[str, Any] = json.loads(raw)
        d["load"] = WorkerLoad(**d.get("load", {}))
        return cls(**d)


class WorkerRegistry:
    """Async registry client. One instance per process; safe for concurrent coroutines."""

    def __init__(self, client: aioredis.Redis, prefix: str = "sglang", ttl_s: float = 6.0) -> None:
        self.redis = client
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)

    @classmethod
    def from_url(cls, url: str, prefix: str = "sglang", ttl_s: float = 6.0) -> WorkerRegistry:
        return cls(aioredis.Redis.from_url(url), prefix, ttl_s)

    def _key(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:workers"

    async def heartbeat(self, record: WorkerRecord) -> None:
        """Register or refresh ``record`` (the key lives ``ttl_s`` past this call)."""
        record.heartbeat_at = time.time()
        async with self.redis.pipeline(transaction=True) as p:
            p.set(self._key(record.worker_id), record.to_json(), px=self.ttl_ms)
            p.sadd(self._index, record.worker_id)
            await p.execute()

    register = heartbeat

    async def deregister(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            p.delete(self._key(worker_id))
            p.srem(self._index, worker_id)
            await p.execute()

    async def list_workers(self, include_draining: bool = False) -> list[WorkerRecord]:
        """Live workers (key not expired), sorted by id; lapsed ids are pruned from the index."""
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(self._index))
        if not ids:
            return []
        raws = await self.redis.mget([self._key(i) for i in ids])
        out: list[WorkerRecord] = []
        lapsed = []
        for wid, raw in zip(ids, raws, strict=True):
            if raw is None:
                lapsed.append(wid)
                continue
            rec = WorkerRecord.from_json(raw)
            if include_draining or not rec.draining:
                out.append(rec)
        if lapsed:
            await self.redis.srem(self._index, *lapsed)
        return out

    async def close(self) -> None:
        await self.redis.aclose()
