"""Worker discovery: the router's live view of the Redis registry, one gRPC client per worker.

Every ``discovery_interval_s`` the registry is read. A worker id seen for the first time gets a
:class:`WorkerHandle` (record + ``WorkerClient``); a known one gets its record (load, draining)
refreshed; one whose key expired (heartbeat lapsed) or that deregistered is dropped, and its
client closed once no request of this router runs on it any more.

A worker is routable when it is not draining and not marked failed; ``routable(model, role)``
filters by role (``unified`` workers serve Generate, ``prefill``/``decode`` workers are paired by
the PD flow). A request that
finds a worker unavailable (``WorkerUnavailable``) marks it failed at once, so new requests avoid it
without waiting for its key to expire; the mark clears when the worker heart-beats again after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sglang.cluster.registry import WorkerRecord, WorkerRegistry
from sglang.observability.metrics import RouterMetrics
from sglang.settings.router import RouterSettings

logger = logging.getLogger(__name__)

ROUTABLE_ROLES = ("unified", "prefill", "decode")


def _default_client_factory(addr: str) -> Any:
    from sglang.transport.worker_client import WorkerClient  # gRPC stack: loaded when first needed

    return WorkerClient(addr)


@dataclass
class WorkerHandle:
    """A worker known from the registry, with this router's client and bookkeeping."""

    record: WorkerRecord
    client: Any  # WorkerClient (generate, get_model_info, close, ...)
    inflight: int = 0
    failed_at: float | None = None  # wall clock of the last WorkerUnavailable, until it re-heartbeats
    failed_heartbeat: float = 0.0  # record.heartbeat_at when it was marked failed
    retired: bool = False  # left the registry; the client closes when inflight reaches 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    @property
    def failed(self) -> bool:
        return self.failed_at is not None

    @property
    def routable(self) -> bool:
        return (
            not self.retired
            and not self.failed
            and not self.record.draining
            and (self.record.role or "unified") in ROUTABLE_ROLES
        )

    @property
    def load(self) -> int:
        """Running + waiting from the last heartbeat, plus this router's requests in flight."""
        ld = self.record.load
        return int(ld.num_running_reqs) + int(ld.num_waiting_reqs) + self.inflight

    def at_capacity(self, max_inflight: int, max_waiting: int) -> bool:
        return self.inflight >= max_inflight or self.record.load.num_waiting_reqs >= max_waiting


class Discovery:
    """Polls the registry and keeps the worker table.

    Contract:
    - ``start()`` reads the registry once (errors are logged, not raised) and then keeps one polling
      task, which ``stop()`` cancels and awaits before closing every client.
    - ``routable(model, role)`` lists routable workers, sorted by id; ``model=None`` means any
      model, ``role=None`` any role.
    - ``track(handle)`` counts a request in flight on ``handle`` for the duration of a ``with``.
    - ``on_added``/``on_removed`` callbacks run on the event loop, synchronously, for each worker
      that appears or leaves (policies forget removed workers; the model catalog loads tokenizers).
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        settings: RouterSettings,
        metrics: RouterMetrics | None = None,
        client_factory: Callable[[str], Any] = _default_client_factory,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.client_factory = client_factory
        self.workers: dict[str, WorkerHandle] = {}
        self._retired: list[WorkerHandle] = []
        self.on_added: list[Callable[[WorkerHandle], None]] = []
        self.on_removed: list[Callable[[str], None]] = []
        self.changed = asyncio.Event()  # set after every poll that changed the table
        self._task: asyncio.Task[None] | None = None
        self._last_error = ""
        self.last_poll_ok = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        handles = list(self.workers.values()) + self._retired
        self.workers.clear()
        self._retired.clear()
        for h in handles:
            await self._close(h)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.discovery_interval_s)
            await self.poll_once()
            await self._close_idle_retired()

    async def poll_once(self) -> None:
        try:
            records = await self.registry.list_workers(include_draining=True)
        except Exception as e:  # Redis down: keep the last known table, say so once
            msg = f"{type(e).__name__}: {e}"
            if msg != self._last_error:
                logger.warning("cannot read the worker registry (%s); keeping %d known workers", msg, len(self.workers))
                self._last_error = msg
            self.last_poll_ok = False
            return
        self._last_error = ""
        self.last_poll_ok = True
        self.apply(records)

    def apply(self, records: list[WorkerRecord]) -> None:
        """Bring the table in line with ``records`` (the registry's current content)."""
        changed = False
        seen = set()
        for rec in records:
            seen.add(rec.worker_id)
            h = self.workers.get(rec.worker_id)
            if h is not None and h.record.grpc_addr != rec.grpc_addr:  # same id, new process/address
                self._remove(rec.worker_id)
                h = None
            if h is None:
                h = WorkerHandle(record=rec, client=self.client_factory(rec.grpc_addr))
                self.workers[rec.worker_id] = h
                changed = True
                logger.info("worker %s joined at %s (model %s)", rec.worker_id, rec.grpc_addr, rec.model)
                for cb in self.on_added:
                    cb(h)
                continue
            if h.record.draining != rec.draining:
                changed = True
                logger.info("worker %s %s", rec.worker_id, "is draining" if rec.draining else "is serving again")
            h.record = rec
            if h.failed and rec.heartbeat_at > h.failed_heartbeat and rec.heartbeat_at > (h.failed_at or 0.0):
                logger.info("worker %s heart-beats again; routing to it resumes", rec.worker_id)
                h.failed_at = None
                changed = True
        for wid in [w for w in self.workers if w not in seen]:
            logger.info("worker %s left the registry", wid)
            self._remove(wid)
            changed = True
        if self.metrics is not None:
            by_role: dict[str, int] = {}
            for h in self.workers.values():
                if h.routable:
                    by_role[h.record.role] = by_role.get(h.record.role, 0) + 1
            for role in ("unified", "prefill", "decode"):
                self.metrics.num_workers.labels(role=role).set(by_role.get(role, 0))
        if changed:
            self.changed.set()
            self.changed = asyncio.Event()

    def _remove(self, worker_id: str) -> None:
        h = self.workers.pop(worker_id)
        h.retired = True
        self._retired.append(h)
        for cb in self.on_removed:
            cb(worker_id)

    async def _close_idle_retired(self) -> None:
        idle = [h for h in self._retired if h.inflight == 0]
        self._retired = [h for h in self._retired if h.inflight > 0]
        for h in idle:
            await self._close(h)

    @staticmethod
    async def _close(h: WorkerHandle) -> None:
        try:
            await h.client.close()
        except Exception as e:  # closing a channel to a dead worker must not stop the router
            logger.debug("closing the client of %s: %s", h.worker_id, e)

    # ------------------------------------------------------------------ queries and marks

    def routable(self, model: str | None = None, role: str | None = None) -> list[WorkerHandle]:
        out = [
            h for h in self.workers.values()
            if h.routable and (model is None or h.record.model == model)
            and (role is None or (h.record.role or "unified") == role)
        ]
        return sorted(out, key=lambda h: h.worker_id)

    def mark_failed(self, worker_id: str) -> None:
        h = self.workers.get(worker_id)
        if h is None or h.failed:
            return
        h.failed_at = time.time()
        h.failed_heartbeat = h.record.heartbeat_at
        logger.warning("worker %s is unavailable; not routing to it until it heart-beats again", worker_id)

    @contextlib.contextmanager
    def track(self, handle: WorkerHandle) -> Iterator[None]:
        handle.inflight += 1
        try:
            yield
        finally:
            handle.inflight -= 1

    @property
    def num_routable(self) -> int:
        return sum(1 for h in self.workers.values() if h.routable)
