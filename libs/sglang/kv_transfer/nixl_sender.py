"""Prefill side of the NIXL connector: pairs with a room's decode agent and WRITEs pages to it.

Per room: ``dest`` reads ``{prefix}:nixl:room:{room}``, checks the layout hash (refusing with
``IncompatibleKVLayout`` and telling the decode side), loads the decode agent's metadata and
descriptor list once per agent, and sends a ``claim`` notification so the decode side knows whom
to watch. Each ``send`` is one WRITE with the chunk notification attached, posted at once (on GPU:
once the current CUDA stream has produced the pages, checked without blocking in ``poll``). The
pool is page-major, so a page (all layers, K and V) is one block: a run of pages consecutive on
both sides is ONE descriptor (UCX pays per descriptor, so fewer, larger writes run closer to the
link's bandwidth); a chunk with no run longer than a page uses the prepared per-page lists.
``poll`` checks the handles, releases finished ones, reads abort notifications from decode, watches
the decode agents' heartbeats and times out writes that make no progress for ``timeout_s``.

A room that closes without success (failed, cancelled here, or aborted by decode, even after it
was reported) is answered with a ``released`` notification once no transfer handle of it is left
(handles NIXL cannot release yet are retried in every ``poll``): only then may the decode side
reuse the room's pages.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
import torch
from nixl._api import nixl_xfer_handle

from sglang.kv_transfer.base import (
    HANDSHAKE_HINT,
    HANDSHAKE_VERSION,
    IncompatibleKVLayout,
    KVLayout,
    KVSender,
    TransferDest,
    TransferStats,
    TransportInfo,
)
from sglang.kv_transfer.metadata import read_agent, room_key
from sglang.kv_transfer.nixl_agent import AgentOptions, NixlKVAgent, PeerUnavailable
from sglang.kv_transfer.notifications import ABORT, CHUNK, CLAIM, RELEASED, Notification, decode

logger = logging.getLogger(__name__)

_CLOSED_ROOMS_KEPT = 65536  # reported/cancelled rooms remembered: no re-pairing, late sends dropped


@dataclass
class _Pending:
    """A chunk waiting for its CUDA event before it is posted."""

    event: Any
    src: list[int]
    dst: list[int]
    chunk: int
    notif: bytes


@dataclass
class _Room:
    peer: str
    dest: TransferDest
    allowed: set[int]
    xfers: list[tuple[nixl_xfer_handle, int]] = field(default_factory=list)  # (handle, chunk) in flight
    pending: list[_Pending] = field(default_factory=list)
    chunks: set[int] = field(default_factory=set)
    last_sent: bool = False
    error: str | None = None
    peer_gone: bool = False  # no "released" owed to a dead decode agent
    bytes: int = 0
    descriptors: int = 0
    first_send: float = 0.0
    wire_since: float | None = None  # when the current stretch of in-flight writes began
    wire_seconds: float = 0.0
    progress: float = field(default_factory=time.monotonic)


class NixlKVSender(KVSender):
    def __init__(
        self,
        kv_pool: Any,
        layout: KVLayout,
        agent_name: str,
        redis_url: str,
        timeout_s: float = 30.0,
        **options: Any,
    ) -> None:
        self.timeout_s = timeout_s
        self.kv = NixlKVAgent(kv_pool, layout, agent_name, redis_url, "prefill", AgentOptions(**options))
        self.device = self.kv.tensors[0].device
        self._rooms: dict[int, _Room] = {}
        self._closed_rooms: OrderedDict[int, None] = OrderedDict()
        self._zombies: list[tuple[nixl_xfer_handle, int]] = []  # (handle, room) NIXL could not release yet
        self._to_release: dict[int, tuple[str, str]] = {}  # room -> (decode agent, why): "released" owed
        self._stats: list[TransferStats] = []
        self._warned_missing: set[str] = set()
        self.kv.local_dlist()

    # ---- pairing -------------------------------------------------------------------------
    def dest(self, room: int) -> TransferDest | None:
        r = self._rooms.get(room)
        if r is not None:
            return r.dest
        if room in self._closed_rooms:
            return None
        raw = self.kv.redis.get(room_key(self.kv.prefix, room))
        if raw is None:
            return None
        d = TransferDest.from_json(raw)  # type: ignore[arg-type]
        if d.version != HANDSHAKE_VERSION or d.layout_hash != self.kv.layout_hash:
            err = self._incompatible(d)
            self.kv.send_notif(d.agent_name, Notification(ABORT, room, error=str(err)).encode())
            raise err
        try:
            self.kv.peer(d.agent_name, d.agent_instance, for_write=True)
        except PeerUnavailable as e:
            if d.agent_name not in self._warned_missing:
                logger.warning("kv_transfer: room %d published by %s, but: %s", room, d.agent_name, e)
                self._warned_missing.add(d.agent_name)
            return None
        self._warned_missing.discard(d.agent_name)
        self._rooms[room] = _Room(d.agent_name, d, set(d.pages))
        self.kv.send_notif(d.agent_name, Notification(CLAIM, room).encode())
        return d

    def _incompatible(self, d: TransferDest) -> IncompatibleKVLayout:
        ctx = f"(room {d.room}, decode agent {d.agent_name})"
        if d.version != HANDSHAKE_VERSION:
            return IncompatibleKVLayout(
                f"incompatible KV handshake {ctx}: handshake_version: prefill {HANDSHAKE_VERSION} != decode "
                f"{d.version} ({HANDSHAKE_HINT})", ["handshake_version"],
            )
        rec = read_agent(self.kv.redis, self.kv.prefix, d.agent_name)
        if rec is None:
            return IncompatibleKVLayout(
                f"incompatible KV layout {ctx}: layout hash prefill {self.kv.layout_hash} != decode "
                f"{d.layout_hash} (decode agent record gone, fields unknown)"
            )
        return IncompatibleKVLayout.between(self.kv.layout, rec.kv_layout, context=ctx)

    # ---- sending -------------------------------------------------------------------------
    def send(
        self,
        room: int,
        src_pages: list[int],
        dst_pages: list[int],
        chunk_id: int,
        last: bool,
        aux: dict[str, Any] | None = None,
    ) -> None:
        if room in self._closed_rooms or (room in self._rooms and self._rooms[room].error):
            logger.info("kv_transfer: dropping a send for room %d (failed, cancelled or reported)", room)
            return
        if self.dest(room) is None:
            raise RuntimeError(f"room {room}: no destination published yet (call dest() until it is not None)")
        r = self._rooms[room]
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"room {room}: {len(src_pages)} src pages but {len(dst_pages)} dst pages")
        if r.last_sent:
            raise ValueError(f"room {room}: the last chunk was already sent")
        if chunk_id in r.chunks:
            raise ValueError(f"room {room}: chunk {chunk_id} sent twice")
        bad_src = [p for p in src_pages if not 0 <= p <= self.kv.num_pages]
        bad_dst = [p for p in dst_pages if p not in r.allowed]
        if bad_src or bad_dst:
            raise ValueError(f"room {room}: src pages {bad_src[:8]} out of range / dst pages {bad_dst[:8]} not published")
        now = time.monotonic()
        if not r.chunks:
            r.first_send = now
        r.chunks.add(chunk_id)
        r.last_sent = last
        r.progress = now
        notif = Notification(CHUNK, room, chunk_id, last, len(r.chunks), aux if last else None).encode()
        if not src_pages:
            if not self.kv.send_notif(r.peer, notif):
                r.error = f"notification to decode agent {r.peer} failed"
            return
        r.bytes += len(src_pages) * self.kv.bytes_per_page_all_layers
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            if not event.query():
                r.pending.append(_Pending(event, list(src_pages), list(dst_pages), chunk_id, notif))
                return
        self._post(room, r, src_pages, dst_pages, chunk_id, notif)

    def _coalesced_xfer(self, peer_name: str, rec: Any, runs: list[tuple[int, int, int]], notif: bytes) -> Any:
        pb = self.kv.page_bytes
        base, remote_base = self.kv.tensors[0].data_ptr(), rec.buffers[0]
        local = np.array([(base + s * pb, n * pb, self.kv.device_id) for s, _, n in runs], dtype=np.uint64)
        remote = np.array([(remote_base + d * pb, n * pb, rec.device_id) for _, d, n in runs], dtype=np.uint64)
        agent = self.kv.agent
        return agent.initialize_xfer(
            "WRITE", agent.get_xfer_descs(local, self.kv.mem_type), agent.get_xfer_descs(remote, rec.mem_type),
            peer_name, notif,
        )

    def _post(self, room: int, r: _Room, src: list[int], dst: list[int], chunk: int, notif: bytes) -> None:
        peer = self.kv.peers.get(r.peer)
        if peer is None or peer.dlist is None:
            r.error = f"decode agent {r.peer} was forgotten"
            return
        try:
            runs = _runs(src, dst)
            if len(runs) < len(src):  # some pages consecutive on both sides: one descriptor per run
                h = self._coalesced_xfer(r.peer, peer.record, runs, notif)
                descriptors = len(runs)
            else:  # block index == page id in both prepared lists
                h = self.kv.agent.make_prepped_xfer(
                    "WRITE", self.kv.local_dlist(), np.asarray(src, dtype=np.int32),
                    peer.dlist, np.asarray(dst, dtype=np.int32), notif,
                )
                descriptors = len(src)
            state = self.kv.agent.transfer(h)
        except Exception as e:  # nixl raises its bindings' error classes
            r.error = f"posting the write of chunk {chunk} to {r.peer} failed: {e}"
            return
        if state == "ERR":
            r.error = f"NIXL write of chunk {chunk} to decode agent {r.peer} failed at post"
            self._drop(h, room)
            return
        r.descriptors += descriptors
        if not r.xfers:
            r.wire_since = time.monotonic()
        r.xfers.append((h, chunk))

    # ---- completion ----------------------------------------------------------------------
    def poll(self) -> list[tuple[int, bool, str | None]]:
        now = time.monotonic()
        self._read_notifs()
        for room, r in self._rooms.items():
            for p in [p for p in r.pending if p.event.query()]:
                r.pending.remove(p)
                self._post(room, r, p.src, p.dst, p.chunk, p.notif)
            still: list[tuple[nixl_xfer_handle, int]] = []
            for h, chunk in r.xfers:
                why = "ERR"
                try:
                    state = self.kv.agent.check_xfer_state(h)
                except Exception as e:  # e.g. nixlRemoteDisconnectError when the decode process died
                    state, why = "ERR", f"{type(e).__name__}: {e}"
                if state == "DONE":
                    self._drop(h, room)
                    r.progress = now
                elif state == "ERR":
                    r.error = r.error or f"NIXL write of chunk {chunk} to decode agent {r.peer} failed ({why})"
                    self._drop(h, room)
                else:
                    still.append((h, chunk))
            if r.xfers and not still and r.wire_since is not None:
                r.wire_seconds += time.monotonic() - r.wire_since
                r.wire_since = None
            r.xfers = still
            if r.error is None and (r.xfers or r.pending) and now - r.progress > self.timeout_s:
                r.error = f"timed out after {self.timeout_s:g}s waiting for KV writes to {r.peer} to complete"
        waiting = {r.peer for r in self._rooms.values() if r.error is None}
        for gone in self.kv.liveness.gone(waiting):
            for r in self._rooms.values():
                if r.peer == gone and r.error is None:
                    r.error = f"decode agent {gone} is gone (its heartbeat in Redis lapsed)"
                    r.peer_gone = True
            self.kv.forget_peer(gone)
        out: list[tuple[int, bool, str | None]] = []
        for room, r in list(self._rooms.items()):
            if r.error is not None:
                out.append((room, False, r.error))
                self._finish(room, r, ok=False, now=now)
            elif r.last_sent and not r.xfers and not r.pending:
                out.append((room, True, None))
                self._finish(room, r, ok=True, now=now)
        self._zombies = [(h, room) for h, room in self._zombies if not self._release(h)]
        self._send_released()
        self.kv.poll_transport()
        return out

    def _read_notifs(self) -> None:
        for agent, msgs in self.kv.notifs().items():
            for raw in msgs:
                n = decode(raw, agent)
                if n is None or n.kind != ABORT:
                    continue
                r = self._rooms.get(n.room)
                if r is None:  # already closed here (or never ours): nothing left to write
                    self._to_release[n.room] = (agent, f"room closed on the prefill side: {n.error}")
                elif r.peer == agent and r.error is None:
                    r.error = f"decode side gave up the room: {n.error}"

    def _finish(self, room: int, r: _Room, ok: bool, now: float) -> None:
        del self._rooms[room]
        for h, _ in r.xfers:
            self._drop(h, room)
        self._remember_closed(room)
        if not ok and not r.peer_gone:
            self._to_release[room] = (r.peer, r.error or "failed on the prefill side")
        if r.chunks:
            self._stats.append(
                TransferStats(room, ok, r.bytes, now - r.first_send, len(r.chunks), r.peer, r.descriptors,
                              r.wire_seconds)
            )

    def _release(self, h: nixl_xfer_handle) -> bool:
        try:
            self.kv.agent.release_xfer_handle(h)
            return True
        except Exception as e:  # an active write NIXL cannot abort: retried in later polls
            logger.debug("kv_transfer: releasing a transfer handle failed (retrying later): %s", e)
            return False

    def _drop(self, h: nixl_xfer_handle, room: int) -> None:
        if not self._release(h):
            self._zombies.append((h, room))

    def _send_released(self) -> None:
        """Tell decode agents which closed rooms hold no transfer handle any more."""
        if not self._to_release:
            return
        busy = {room for _, room in self._zombies}
        for room, (peer, why) in list(self._to_release.items()):
            if room not in busy:
                del self._to_release[room]
                self.kv.send_notif(peer, Notification(RELEASED, room, error=why).encode())

    def _remember_closed(self, room: int) -> None:
        self._closed_rooms[room] = None
        while len(self._closed_rooms) > _CLOSED_ROOMS_KEPT:
            self._closed_rooms.popitem(last=False)

    def cancel(self, room: int) -> None:
        r = self._rooms.pop(room, None)
        self._remember_closed(room)
        if r is None:
            return
        if r.error is None:
            self.kv.send_notif(r.peer, Notification(ABORT, room, error="cancelled by the prefill side").encode())
        for h, _ in r.xfers:
            self._drop(h, room)
        self._to_release[room] = (r.peer, r.error or "cancelled by the prefill side")
        self._send_released()

    @property
    def writing(self) -> bool:
        """Writes posted and not yet seen complete, or chunks waiting for their forward to finish."""
        return any(r.xfers or r.pending for r in self._rooms.values())

    def pop_stats(self) -> list[TransferStats]:
        out, self._stats = self._stats, []
        return out

    def transport_info(self) -> TransportInfo:
        return self.kv.transport_info()

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for room in list(self._rooms):
            self.cancel(room)
        self._zombies = [(h, room) for h, room in self._zombies if not self._release(h)]
        self._send_released()
        self._zombies = []
        try:
            self.kv.close()
        except redis.RedisError as e:
            logger.warning("kv_transfer: close: %s", e)


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, length)`` of maximal runs where both page lists are consecutive."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs

