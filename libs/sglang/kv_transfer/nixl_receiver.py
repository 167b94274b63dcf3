"""Decode side of the NIXL connector: publishes room destinations and waits for their KV.

The pool is registered with NIXL once; prefill agents WRITE into it one-sidedly and each write's
notification arrives after its data. A room is done when its last chunk (which carries the chunk
count and ``aux``) and every earlier chunk have been notified. A room fails when nothing happened
for ``timeout_s`` (since publish, the claim or the last chunk), when the prefill agent that
claimed it stops heartbeating, or when that agent aborts it. On failure or cancel the room's
Redis key is deleted and a live prefill agent is told to stop.

Quarantine: a room that ends without its last chunk after a prefill agent claimed it may still
receive a write (one in flight, or posted before that agent reads the abort), so its pages are
not handed back at once: the result says ``quarantined`` (``cancel`` returns False) and
``released`` names the room later, when the agent sends ``released`` (it dropped every transfer
of the room), when its heartbeat lapses (a dead process writes nothing), or, as a last resort
logged loudly, after ``quarantine_s`` (default 2 x ``timeout_s``). Rooms nobody claimed, rooms
whose agent is gone and rooms the agent itself released are freed at once. A ``claim`` that
arrives for a room already cancelled unclaimed is answered with an ``abort``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
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
from sglang.kv_transfer.notifications import ABORT, CHUNK, CLAIM, RELEASED, Notification, decode

logger = logging.getLogger(__name__)

_CANCELLED_KEPT = 4096  # unclaimed cancelled rooms remembered, to answer a late claim with abort


@dataclass
class _Wait:
    pages: list[int]
    progress: float = field(default_factory=time.monotonic)
    sender: str | None = None
    claimed: bool = False  # a claim (or a chunk) arrived: the sender may write into the pages
    chunks: set[int] = field(default_factory=set)
    num_chunks: int | None = None  # known once the last chunk arrived
    aux: dict[str, Any] | None = None


@dataclass
class _Quarantine:
    """A failed or cancelled room whose pages the claiming prefill agent may still write."""

    sender: str
    error: str
    since: float = field(default_factory=time.monotonic)


class NixlKVReceiver(KVReceiver):
    def __init__(
        self,
        kv_pool: Any,
        layout: KVLayout,
        agent_name: str,
        redis_url: str,
        timeout_s: float = 30.0,
        room_ttl_s: float | None = None,
        quarantine_s: float | None = None,
        **options: Any,
    ) -> None:
        self.timeout_s = timeout_s
        self.quarantine_s = quarantine_s if quarantine_s is not None else 2 * timeout_s
        # The room key outlives the wait a little, and is deleted as soon as the room is reported.
        self.room_ttl_ms = int(1000 * (room_ttl_s if room_ttl_s is not None else max(60.0, 4 * timeout_s)))
        self.kv = NixlKVAgent(kv_pool, layout, agent_name, redis_url, "decode", AgentOptions(**options))
        self._rooms: dict[int, _Wait] = {}
        self.quarantined: dict[int, _Quarantine] = {}
        self._released: list[int] = []
        self._cancelled: OrderedDict[int, None] = OrderedDict()
        self._closed = False

    def publish(self, room: int, pages: list[int]) -> None:
        if room in self._rooms or room in self.quarantined:
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
        senders |= {q.sender for q in self.quarantined.values()}
        for gone in self.kv.liveness.gone(senders):
            err = f"prefill agent {gone} is gone (its heartbeat in Redis lapsed)"
            for room, w in list(self._rooms.items()):
                if w.sender == gone:
                    out.append(self._fail(room, err, notify=False, hold=False))
            for room, q in list(self.quarantined.items()):
                if q.sender == gone:
                    self._release(room, err)
            self.kv.forget_peer(gone)
        for room, w in list(self._rooms.items()):
            if now - w.progress > self.timeout_s:
                out.append(self._fail(room, f"timed out after {self.timeout_s:g}s waiting for KV", notify=True))
        for room, q in list(self.quarantined.items()):
            if now - q.since > self.quarantine_s:
                logger.error(
                    "!!! kv_transfer: room %d: prefill agent %s neither acknowledged the abort nor went away "
                    "in %gs; freeing its pages anyway (a late write could corrupt another request's KV)",
                    room, q.sender, self.quarantine_s,
                )
                self._release(room, "quarantine timed out")
        if out:
            self._delete_keys([r.room for r in out])
        self.kv.poll_transport()
        return out

    def _on_notif(self, agent: str, n: Notification, now: float, out: list[RoomResult]) -> None:
        q = self.quarantined.get(n.room)
        if q is not None and n.kind == RELEASED and q.sender == agent:
            self._release(n.room, f"released by {agent}")
            return
        w = self._rooms.get(n.room)
        if w is None:
            if n.kind == CLAIM and n.room in self._cancelled:  # claimed after we gave it up unclaimed
                self.kv.send_notif(agent, Notification(ABORT, n.room, error="cancelled by the decode side").encode())
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
        if n.kind == RELEASED:  # closed on its side with nothing in flight: the pages are free now
            out.append(self._fail(n.room, f"prefill side gave up the room: {n.error}", notify=False, hold=False))
            return
        w.claimed = True  # a claim, or a chunk (which implies one)
        if n.kind == CLAIM:
            return
        if n.kind == CHUNK:
            w.chunks.add(n.chunk)
            if n.last:
                w.num_chunks, w.aux = n.num_chunks, n.aux if n.aux is not None else {}
        if w.num_chunks is not None and len(w.chunks) >= w.num_chunks:
            del self._rooms[n.room]
            out.append(RoomResult(n.room, True, w.aux, None))

    def _fail(self, room: int, error: str, notify: bool, hold: bool = True) -> RoomResult:
        """Forget the waiting room; ``hold``: quarantine it if a prefill agent claimed it."""
        w = self._rooms.pop(room)
        if notify and w.sender is not None:
            self.kv.send_notif(w.sender, Notification(ABORT, room, error=error).encode())
        held = self._hold(room, w, error) if hold else False
        logger.info("kv_transfer: room %d failed%s: %s", room, " (pages quarantined)" if held else "", error)
        return RoomResult(room, False, None, error, quarantined=held)

    def _hold(self, room: int, w: _Wait, error: str) -> bool:
        if not w.claimed or w.sender is None:
            return False
        self.quarantined[room] = _Quarantine(w.sender, error)
        return True

    def _release(self, room: int, why: str) -> None:
        del self.quarantined[room]
        self._released.append(room)
        logger.info("kv_transfer: room %d: quarantined pages released (%s)", room, why)

    def released(self) -> list[int]:
        out, self._released = self._released, []
        return out

    def _delete_keys(self, rooms: list[int]) -> None:
        try:
            self.kv.redis.delete(*[room_key(self.kv.prefix, r) for r in rooms])
        except redis.RedisError as e:
            logger.warning("kv_transfer: could not delete room keys (they expire by TTL): %s", e)

    def cancel(self, room: int) -> bool:
        w = self._rooms.pop(room, None)
        self._delete_keys([room])
        if w is None:
            return True
        if w.sender is not None:
            self.kv.send_notif(w.sender, Notification(ABORT, room, error="cancelled by the decode side").encode())
        if self._hold(room, w, "cancelled by the decode side"):
            return False
        self._cancelled[room] = None
        while len(self._cancelled) > _CANCELLED_KEPT:
            self._cancelled.popitem(last=False)
        return True

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
