"""Decode side of the NIXL connector: publishes room destinations and waits for their KV.

The pool is registered with NIXL once; prefill agents WRITE into it one-sidedly and each write's
notification arrives after its data. A room is done when its last chunk (which carries the chunk
count and ``aux``) and every earlier chunk have been notified. A room fails when nothing happened
for ``timeout_s`` (since publish, the claim or the last chunk), when the prefill agent that
claimed it stops heartbeating, or when that agent aborts it. On failure or cancel the room's
Redis key is deleted and a live prefill agent is told to stop, so that it does not keep writing
into pages the caller is about to free.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from sglang.kv_transfer.base import (
    HANDSHAKE_VERSION,
    KVLayout,
    KVReceiver,
    RoomResult,
    TransferDest,
    TransportInfo,
)
from sglang.kv_transfer.metadata import room_key
from sglang.kv_transfer.nixl_agent import AgentOptions, NixlKVAgent
from sglang.kv_transfer.notifications import ABORT, CHUNK, CLAIM, Notification, decode

logger = logging.getLogger(__name__)


@dataclass
class _Wait:
    pages: list[int]
    progress: float = field(default_factory=time.monotonic)
    sender: str | None = None
    chunks: set[int] = field(default_factory=set)
    num_chunks: int | None = None  # known once the last chunk arrived
    aux: dict[str, Any] | None = None


class NixlKVReceiver(KVReceiver):
    def __init__(
        self,
        kv_pool: Any,
        layout: KVLayout,
        agent_name: str,
        redis_url: str,
        timeout_s: float = 30.0,
        room_ttl_s: float | None = None,
        **options: Any,
    ) -> None:
        self.timeout_s = timeout_s
        # The room key outlives the wait a little, and is deleted as soon as the room is reported.
        self.room_ttl_ms = int(1000 * (room_ttl_s if room_ttl_s is not None else max(60.0, 4 * timeout_s)))
        self.kv = NixlKVAgent(kv_pool, layout, agent_name, redis_url, "decode", AgentOptions(**options))
        self._rooms: dict[int, _Wait] = {}
        self._closed = False

    def publish(self, room: int, pages: list[int]) -> None:
        if room in self._rooms:
            raise ValueError(f"room {room} is already published")
        bad = [p for p in pages if not 0 <= p <= self.kv.num_pages]
        if bad:
            raise ValueError(f"room {room}: pages {bad[:8]} outside the pool (1..{self.kv.num_pages})")
        d = TransferDest(room, self.kv.name, list(pages), self.kv.layout_hash, HANDSHAKE_VERSION, self.kv.instance)
        self.kv.redis.set(room_key(self.kv.prefix, room), d.to_json(), px=self.room_ttl_ms)
        self._rooms[room] = _Wait(list(pages))

    def poll(self) -> list[RoomResult]:
        out: list[RoomResult] = []
        now = time.monotonic()
        for agent, msgs in self.kv.notifs().items():
            for raw in msgs:
                n = decode(raw, agent)
                if n is not None:
                    self._on_notif(agent, n, now, out)
        senders = {w.sender for w in self._rooms.values() if w.sender is not None}
        for gone in self.kv.liveness.gone(senders):
            for room, w in list(self._rooms.items()):
                if w.sender == gone:
                    err = f"prefill agent {gone} is gone (its heartbeat in Redis lapsed)"
                    out.append(self._fail(room, err, notify=False))
            self.kv.forget_peer(gone)
        for room, w in list(self._rooms.items()):
            if now - w.progress > self.timeout_s:
                out.append(self._fail(room, f"timed out after {self.timeout_s:g}s waiting for KV", notify=True))
        if out:
            self._delete_keys([r.room for r in out])
        self.kv.poll_transport()
        return out

    def _on_notif(self, agent: str, n: Notification, now: float, out: list[RoomResult]) -> None:
        w = self._rooms.get(n.room)
        if w is None:
            logger.debug("kv_transfer: ignoring %s for unknown room %d from %s", n.kind, n.room, agent)
            return
        if w.sender is None:
            w.sender = agent
        elif w.sender != agent:
            logger.warning("kv_transfer: room %d claimed by %s, ignoring %s from %s", n.room, w.sender, n.kind, agent)
            return
        w.progress = now
        if n.kind == ABORT:
            out.append(self._fail(n.room, f"prefill side gave up the room: {n.error}", notify=False))
            return
        if n.kind == CLAIM:
            return
        if n.kind == CHUNK:
            w.chunks.add(n.chunk)
            if n.last:
                w.num_chunks, w.aux = n.num_chunks, n.aux if n.aux is not None else {}
        if w.num_chunks is not None and len(w.chunks) >= w.num_chunks:
            del self._rooms[n.room]
            out.append(RoomResult(n.room, True, w.aux, None))

    def _fail(self, room: int, error: str, notify: bool) -> RoomResult:
        w = self._rooms.pop(room)
        if notify and w.sender is not None:
            self.kv.send_notif(w.sender, Notification(ABORT, room, error=error).encode())
        logger.info("kv_transfer: room %d failed: %s", room, error)
        return RoomResult(room, False, None, error)

    def _delete_keys(self, rooms: list[int]) -> None:
        try:
            self.kv.redis.delete(*[room_key(self.kv.prefix, r) for r in rooms])
        except redis.RedisError as e:
            logger.warning("kv_transfer: could not delete room keys (they expire by TTL): %s", e)

    def cancel(self, room: int) -> None:
        w = self._rooms.pop(room, None)
        self._delete_keys([room])
        if w is not None and w.sender is not None:
            self.kv.send_notif(w.sender, Notification(ABORT, room, error="cancelled by the decode side").encode())

    def transport_info(self) -> TransportInfo:
        return self.kv.transport_info()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for room in list(self._rooms):
            self.cancel(room)
        try:
            self.kv.close()
        except redis.RedisError as e:
            logger.warning("kv_transfer: close: %s", e)
