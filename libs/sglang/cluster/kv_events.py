"""KV cache events on Redis streams: the engine's prefix-cache events, per worker.

Stream ``{prefix}:kv_events:{worker_id}``, one entry per :class:`KVEventBatch` (``XADD ... MAXLEN ~
maxlen``, so old entries are trimmed), with the string fields:

* ``seq``: the publisher's batch number (0, 1, 2, ...; a gap means batches were dropped, e.g. while
  Redis was unreachable: the consumer should treat this worker's view as stale). ``-1`` marks the
  ``cleared`` batch each forwarder writes when it starts and when it stops, so consumers reset
  their view of the worker;
* ``ts``: publish time (Unix seconds, float);
* ``worker_id``;
* ``events``: a JSON list, each item one of
  ``{"type": "stored", "block_hashes": [int], "parent_block_hash": int | null, "token_ids": [int],
  "block_size": int, "extra_key": str | null}``, ``{"type": "removed", "block_hashes": [int]}``,
  ``{"type": "cleared"}``. Hashes are the chained 64-bit page hashes of
  ``sglang.engine.prefix_cache.events`` (unsigned; JSON integers).

Consumers ``XREAD`` from ``$`` (or from 0 to replay what is retained) and decode with
:func:`decode_entry`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from sglang.engine.prefix_cache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
)

logger = logging.getLogger(__name__)

CLEARED_SEQ = -1


def stream_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:kv_events:{worker_id}"


def event_to_json(ev: KVEvent) -> dict[str, Any]:
    if isinstance(ev, BlockStored):
        return {
            "type": "stored", "block_hashes": list(ev.block_hashes), "parent_block_hash": ev.parent_block_hash,
            "token_ids": list(ev.token_ids), "block_size": ev.block_size, "extra_key": ev.extra_key,
        }
    if isinstance(ev, BlockRemoved):
        return {"type": "removed", "block_hashes": list(ev.block_hashes)}
    if isinstance(ev, AllBlocksCleared):
        return {"type": "cleared"}
    raise TypeError(f"unknown KV event {type(ev).__name__}")


def event_from_json(d: dict[str, Any]) -> KVEvent:
    kind = d.get("type")
    if kind == "stored":
        return BlockStored(
            block_hashes=list(d["block_hashes"]), parent_block_hash=d.get("parent_block_hash"),
            token_ids=list(d["token_ids"]), block_size=int(d["block_size"]), extra_key=d.get("extra_key"),
        )
    if kind == "removed":
        return BlockRemoved(block_hashes=list(d["block_hashes"]))
    if kind == "cleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event type {kind!r}")


def encode_batch(batch: KVEventBatch, worker_id: str) -> dict[str, str]:
    """The fields of one stream entry."""
    events = json.dumps([event_to_json(e) for e in batch.events], separators=(",", ":"))
    return {"seq": str(batch.seq), "ts": repr(batch.ts), "worker_id": worker_id, "events": events}


def decode_entry(fields: dict[Any, Any]) -> tuple[str, KVEventBatch]:
    """``(worker_id, batch)`` from the fields of a stream entry (bytes or str keys/values)."""
    f = {_s(k): _s(v) for k, v in fields.items()}
    batch = KVEventBatch(
        seq=int(f["seq"]), ts=float(f["ts"]), events=[event_from_json(d) for d in json.loads(f["events"])]
    )
    return f.get("worker_id", ""), batch


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class RedisKVEventForwarder:
    """Forwards an engine's KV event batches to its Redis stream.

    Contract: :meth:`on_batch` is the ``InProcessPublisher.subscribe`` callback. It runs on the
    engine's scheduler thread, never blocks and never touches Redis: it appends to a bounded
    thread-safe deque (the oldest batches are dropped past ``max_pending``) and wakes the
    :meth:`run` task on the event loop, which writes everything pending in one pipeline. Redis errors
    are logged and retried with backoff; they never reach the engine. :meth:`run` returns after
    :meth:`stop` once what is pending has been written (or could not be).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        worker_id: str,
        loop: asyncio.AbstractEventLoop,
        prefix: str = "sglang",
        maxlen: int = 10_000,
        max_pending: int = 10_000,
        stream_ttl_s: float = 3600.0,
    ) -> None:
        self.redis = client
        self.worker_id = worker_id
        self.key = stream_key(prefix, worker_id)
        self.maxlen = maxlen
        self.stream_ttl_ms = int(stream_ttl_s * 1000)
        self._loop = loop
        self._pending: collections.deque[KVEventBatch] = collections.deque(maxlen=max_pending)
        self._wake = asyncio.Event()
        self._stopping = False
        self.num_written = 0  # batches written to Redis (including the cleared markers)

    # ---- engine thread ----
    def on_batch(self, batch: KVEventBatch) -> None:
        self._pending.append(batch)
        with contextlib.suppress(RuntimeError):  # a closed loop: the process is exiting
            self._loop.call_soon_threadsafe(self._wake.set)

    # ---- event loop ----
    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def _cleared(self) -> KVEventBatch:
        return KVEventBatch(seq=CLEARED_SEQ, ts=time.time(), events=[AllBlocksCleared()])

    async def _write(self, batches: list[KVEventBatch]) -> None:
        async with self.redis.pipeline(transaction=False) as p:
            for b in batches:
                fields: dict[Any, Any] = encode_batch(b, self.worker_id)
                p.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
            p.pexpire(self.key, self.stream_ttl_ms)
            await p.execute()
        self.num_written += len(batches)

    async def run(self) -> None:
        backoff = 0.05
        first: list[KVEventBatch] = [self._cleared()]
        while True:
            stopping = self._stopping  # decided before building the batch: the stop marker goes last
            batches = first + [self._pending.popleft() for _ in range(len(self._pending))]
            if stopping:
                batches.append(self._cleared())
            if batches:
                try:
                    await self._write(batches)
                    first, backoff = [], 0.05
                except (aioredis.RedisError, OSError) as e:
                    if stopping:
                        logger.warning("dropping %d KV event batches at shutdown: %s", len(batches), e)
                        return
                    logger.warning("KV events to %s failed (%s); retrying in %.2fs", self.key, e, backoff)
                    first = batches[-(self._pending.maxlen or len(batches)) :]  # bounded; seq shows gaps
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
            if stopping:
                return
            self._wake.clear()
            if not self._pending and not self._stopping:
                await self._wake.wait()
