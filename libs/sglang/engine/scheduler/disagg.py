"""Prefill/decode disaggregation inside the scheduler.

Prefill side: a request carrying a ``bootstrap_room`` is prefilled as usual (chunked, with its
prefix cache). After every chunk, its completed pages are written to the decode worker's pages
for that room (once the decode side has published them); when the first token is sampled the
request leaves the running batch, the remaining pages go out with the first token as the last
chunk, and the request finishes once every write completed. With ``return_logprob``, the last
chunk's ``aux`` also carries the first token's top logprobs and the prompt logprobs (compact,
bounded: engine/scheduler/pd_aux.py), so a PD request reports what a unified engine reports. Its pages stay pinned (never
retracted, never swapped for cached duplicates) until then.

Decode side: a request waits in the *prealloc* queue until pages for its whole prompt can be
reserved, publishes those pages for its room, waits in the *transfer* queue for the KV, then
joins the running batch with ``num_computed = len(prompt)`` and the first token appended, so the
prompt is never recomputed. A room that fails or times out finishes with an abort; so does an
abort from the client. Its pages are freed at once only when no prefill can still write into them
(nobody claimed the room, or the prefill's agent is gone); otherwise they are *quarantined*
(``quarantine``: room -> pages, counted in use, in no free list) until the connector's
``released`` names the room: the prefill acknowledged that it dropped every write, its agent
died, or a bounded quarantine timeout passed. A late NIXL write therefore never lands in pages
another request already holds.

Failures never stop the scheduler: a connector error (Redis down, an incompatible decode layout,
a refused write) fails only the request it concerns, with ``finish_reason`` abort and a message.
A prefill request that ends any other way (client abort, KV cache full, engine shutdown) cancels
its room, which tells the decode side at once. ``close`` releases the connector (its agent, Redis
records and threads); the engine calls it after the scheduler thread stopped.

Counters (read by ``Engine.get_stats``): ``transfer_bytes``, ``transfer_seconds``, ``transfers_ok``,
``transfers_failed``; cumulative, the metrics exporter turns them into rates.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from sglang.engine.memory import OutOfPagesError
from sglang.engine.scheduler.pd_aux import apply_aux, build_aux
from sglang.engine.scheduler.request import FinishReason, Request

if TYPE_CHECKING:
    from sglang.engine.scheduler.scheduler import Scheduler
    from sglang.kv_transfer.base import KVReceiver, KVSender

logger = logging.getLogger(__name__)


class _Counters:
    """Cumulative transfer statistics of one side."""

    def __init__(self) -> None:
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        self.transfer_wire_seconds = 0.0
        self.transfers_ok = 0
        self.transfers_failed = 0

    def stats(self) -> dict[str, Any]:
        return {
            "kv_transfer_bytes_total": self.transfer_bytes,
            "kv_transfer_seconds_total": self.transfer_seconds,
            "kv_transfer_wire_seconds_total": self.transfer_wire_seconds,
            "kv_transfer_reqs_total": self.transfers_ok,
            "kv_transfer_failed_reqs_total": self.transfers_failed,
        }


class PrefillSide(_Counters):
    def __init__(
        self, sender: KVSender, page_size: int, timeout_s: float, chunk_delay_s: float = 0.0,
        chunk_delay_min_prompt: int = 0, spin: bool = False,
    ) -> None:
        super().__init__()
        self.sender = sender
        self.spin = spin
        self.page_size = page_size
        self.timeout_s = timeout_s
        # Test hook (SGLANG_TEST_PD_CHUNK_DELAY_S, SGLANG_TEST_PD_CHUNK_DELAY_MIN_PROMPT): sleep
        # this long on the scheduler thread after every non-final chunk sent for a prompt of at
        # least that many tokens, to hold a request mid-transfer. 0 in production.
        self.chunk_delay_s = chunk_delay_s
        self.chunk_delay_min_prompt = chunk_delay_min_prompt
        self.sending: dict[int, Request] = {}  # room -> request that finished prefill, writes in flight
        self.awaiting_dest: dict[int, Request] = {}  # prefilled, decode has not published pages yet

    def owns(self, req: Request) -> bool:
        return req.bootstrap_room is not None

    def pinned(self, req: Request) -> bool:
        """Requests whose pages may be read by an in-flight write."""
        return req.bootstrap_room is not None and req.pd_sent_pages > 0

    @property
    def inflight(self) -> list[Request]:
        return list(self.sending.values()) + list(self.awaiting_dest.values())

    @property
    def busy(self) -> bool:
        """Something to poll for between steps."""
        return bool(self.sending or self.awaiting_dest)

    @property
    def hot(self) -> bool:
        """GPU writes in flight: they finish within milliseconds, so the loop polls without
        sleeping until they do (on CPU the writes run on the same cores: it sleeps)."""
        return self.spin and self.sender.writing

    def after_chunk(self, sched: Scheduler, req: Request) -> bool:
        """Send the whole pages this chunk completed, when the destination is known. False when
        the request failed (it is finished with an abort)."""
        try:
            dest = self.sender.dest(req.bootstrap_room)  # type: ignore[arg-type]
            if dest is None:
                return True
            full = req.num_computed // self.page_size
            if full > req.pd_sent_pages:
                self._send(req, dest.pages, req.pd_sent_pages, full, last=False)
                if self.chunk_delay_s > 0 and len(req.prompt_ids) >= self.chunk_delay_min_prompt:
                    time.sleep(self.chunk_delay_s)
        except Exception as e:  # connector errors fail this request, not the scheduler
            logger.warning("prefill %s (room %s): %s", req.rid, req.bootstrap_room, e)
            self.transfers_failed += 1
            sched.finish_external(req, FinishReason("abort", message=f"KV transfer failed: {e}"))
            return False
        return True

    def on_prefilled(self, sched: Scheduler, req: Request, reason: FinishReason | None) -> None:
        """First token sampled: leave the running batch and send the rest with it."""
        sched.running.remove(req)
        room = req.bootstrap_room
        assert room is not None
        req.pd_deadline = time.monotonic() + self.timeout_s
        req.pd_finish = reason or FinishReason("length")
        self.awaiting_dest[room] = req
        try:
            self._try_last(req)
        except Exception as e:
            logger.warning("prefill %s (room %s): %s", req.rid, room, e)
            self._fail(sched, room, req, f"KV transfer failed: {e}")

    def _try_last(self, req: Request) -> bool:
        room = req.bootstrap_room
        assert room is not None
        dest = self.sender.dest(room)
        if dest is None:
            return False
        total = -(-len(req.prompt_ids) // self.page_size)
        if len(dest.pages) != total:
            raise ValueError(f"room {room}: decode reserved {len(dest.pages)} pages, prefill has {total}")
        aux = build_aux(req)  # raises past MAX_AUX_BYTES (huge prompt logprobs): the room fails
        self._send(req, dest.pages, req.pd_sent_pages, total, last=True, aux=aux)
        del self.awaiting_dest[room]
        self.sending[room] = req
        return True

    def _send(self, req: Request, dst: list[int], lo: int, hi: int, last: bool, aux: dict | None = None) -> None:
        self.sender.send(req.bootstrap_room, req.pages[lo:hi], dst[lo:hi], req.pd_chunks, last, aux)  # type: ignore[arg-type]
        req.pd_chunks += 1
        req.pd_sent_pages = hi

    def poll(self, sched: Scheduler) -> list[Request]:
        done: list[Request] = []
        now = time.monotonic()
        for room, req in list(self.awaiting_dest.items()):
            try:
                if self._try_last(req):
                    continue
            except Exception as e:
                self._fail(sched, room, req, f"KV transfer failed: {e}")
                done.append(req)
                continue
            if now > req.pd_deadline:
                self._fail(sched, room, req, f"decode side never published pages for room {room} in {self.timeout_s}s")
                done.append(req)
        try:
            results = self.sender.poll()
        except Exception as e:  # e.g. Redis unreachable for the liveness check: next step retries
            logger.warning("KV sender poll failed: %s", e)
            results = []
        for room, ok, err in results:
            sent = self.sending.pop(room, None)
            if sent is None:
                if not ok:  # failed while still prefilling (e.g. the decode side gave up)
                    done += self._fail_prefilling(sched, room, err)
                continue
            if ok:
                sched.finish_external(sent, sent.pd_finish or FinishReason("length"))
            else:
                self.transfers_failed += 1
                sched.finish_external(sent, FinishReason("abort", message=f"KV transfer failed: {err}"))
            done.append(sent)
        for st in self.sender.pop_stats():
            if st.ok:
                self.transfers_ok += 1
                self.transfer_bytes += st.bytes
                self.transfer_seconds += st.seconds
                self.transfer_wire_seconds += st.wire_seconds or st.seconds
        for room, req in list(self.sending.items()):
            if now > req.pd_deadline + self.timeout_s:
                self._fail(sched, room, req, "KV transfer timed out")
                done.append(req)
        return done

    def _fail(self, sched: Scheduler, room: int, req: Request, msg: str, count: bool = True) -> None:
        self.awaiting_dest.pop(room, None)
        self.sending.pop(room, None)
        self.transfers_failed += count
        self.sender.cancel(room)
        sched.finish_external(req, FinishReason("abort", message=msg))

    def _fail_prefilling(self, sched: Scheduler, room: int, err: str | None) -> list[Request]:
        for req in [*sched.running, *sched.waiting]:
            if req.bootstrap_room == room and not req.finished:
                self.transfers_failed += 1
                sched.finish_external(req, FinishReason("abort", message=f"KV transfer failed: {err}"))
                return [req]
        return []

    def on_finish(self, req: Request) -> None:
        """Any prefill request that finishes outside ``poll``'s paths (client abort while
        prefilling, KV cache full, shutdown): cancel its room so the decode side fails it now."""
        room = req.bootstrap_room
        if room is not None and room not in self.sending and room not in self.awaiting_dest:
            self.sender.cancel(room)

    def abort_all(self, sched: Scheduler, message: str) -> list[Request]:
        reqs = self.inflight
        for req in reqs:
            self._fail(sched, req.bootstrap_room, req, message, count=False)  # type: ignore[arg-type]
        return reqs

    def close(self) -> None:
        self.sender.close()

    def abort(self, sched: Scheduler, req: Request) -> bool:
        room = req.bootstrap_room
        if room in self.awaiting_dest or room in self.sending:
            self._fail(sched, room, req, "aborted by the client", count=False)  # type: ignore[arg-type]
            return True
        return False


class DecodeSide(_Counters):
    def __init__(self, receiver: KVReceiver, page_bytes: int = 0) -> None:
        super().__init__()
        self.receiver = receiver
        self.page_bytes = page_bytes  # one page, all layers, K and V (for the bytes counter)
        self.prealloc: deque[Request] = deque()
        self.transfer: dict[int, Request] = {}
        self._published_at: dict[int, float] = {}
        self.quarantine: dict[int, list[int]] = {}  # room -> pages a late write may still reach

    @property
    def inflight(self) -> list[Request]:
        return list(self.prealloc) + list(self.transfer.values())

    @property
    def busy(self) -> bool:
        """Something to poll for between steps: rooms in flight, or quarantined pages to release."""
        return bool(self.prealloc or self.transfer or self.quarantine)

    @property
    def hot(self) -> bool:
        return False  # waits on a prefill's forward: the loop's short sleep is enough

    def add(self, req: Request) -> None:
        if req.bootstrap_room is None:
            raise ValueError("a decode worker needs bootstrap_room on every request")
        self.prealloc.append(req)

    def poll(self, sched: Scheduler) -> list[Request]:
        updated: list[Request] = []
        while self.prealloc and sched.can_admit():
            req = self.prealloc[0]
            prompt = len(req.prompt_ids)
            if sched.kv.pages_needed(req, prompt) > sched.kv.available_pages - sched.reserved_pages():
                break
            try:
                sched.kv.grow(req, prompt)
            except OutOfPagesError:
                sched.kv.release(req, keep_in_cache=False)
                break
            self.prealloc.popleft()
            room = req.bootstrap_room
            assert room is not None
            if room in self.transfer:
                sched.finish_external(req, FinishReason("abort", message=f"bootstrap_room {room} is already in use"))
                updated.append(req)
                continue
            try:
                self.receiver.publish(room, list(req.pages))
            except Exception as e:  # Redis down: this request fails, the scheduler goes on
                logger.warning("decode %s: publishing room %d failed: %s", req.rid, room, e)
                self.transfers_failed += 1
                sched.finish_external(req, FinishReason("abort", message=f"KV transfer failed: {e}"))
                updated.append(req)
                continue
            self.transfer[room] = req
            self._published_at[room] = time.monotonic()
        try:
            results = self.receiver.poll()
        except Exception as e:
            logger.warning("KV receiver poll failed: %s", e)
            results = []
        for res in results:
            got = self.transfer.pop(res.room, None)
            started = self._published_at.pop(res.room, None)
            if got is None:
                continue
            updated.append(got)
            if not res.ok or not res.aux:
                self.transfers_failed += 1
                if res.quarantined:
                    self._hold(sched, res.room, got)
                sched.finish_external(got, FinishReason("abort", message=f"KV transfer failed: {res.error}"))
                continue
            self.transfers_ok += 1
            self.transfer_bytes += len(got.pages) * self.page_bytes
            self.transfer_seconds += time.monotonic() - started if started is not None else 0.0
            try:
                top = apply_aux(got, res.aux)
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("decode %s (room %d): %s", got.rid, res.room, e)
                sched.finish_external(got, FinishReason("abort", message=f"KV transfer failed: {e}"))
                continue
            got.num_computed = len(got.prompt_ids)
            got.cached_tokens = int(res.aux.get("cached_tokens") or 0)
            got.admitted_once = True  # a later retraction recomputes here but keeps cached_tokens
            sched.admit_prefilled(got, int(res.aux["first_token"]), res.aux.get("logprob"), top)
        self._free_released(sched)
        return updated

    def _hold(self, sched: Scheduler, room: int, req: Request) -> None:
        """Quarantine ``req``'s pages (before it is finished and released)."""
        pages = sched.kv.quarantine(req)
        if pages:
            self.quarantine[room] = pages

    def _free_released(self, sched: Scheduler) -> None:
        try:
            rooms = self.receiver.released()
        except Exception as e:  # asked again next step
            logger.warning("KV receiver released() failed: %s", e)
            return
        for room in rooms:
            pages = self.quarantine.pop(room, None)
            if pages:
                sched.kv.free_quarantined(pages)

    @property
    def quarantined_pages(self) -> int:
        return sum(len(p) for p in self.quarantine.values())

    def abort(self, sched: Scheduler, req: Request) -> bool:
        if req in self.prealloc:
            self.prealloc.remove(req)
        elif self.transfer.get(req.bootstrap_room) is req:  # type: ignore[arg-type]
            self._cancel(sched, req.bootstrap_room)  # type: ignore[arg-type]
        else:
            return False
        sched.finish_external(req, FinishReason("abort", message="aborted by the client"))
        return True

    def _cancel(self, sched: Scheduler, room: int) -> None:
        """Withdraw a published room; its request is finished by the caller right after."""
        req = self.transfer.pop(room)
        self._published_at.pop(room, None)
        try:
            free_now = self.receiver.cancel(room)
        except Exception as e:  # the receiver holds nothing for the room: free, as nothing names it later
            logger.warning("cancelling room %d failed: %s", room, e)
            free_now = True
        if not free_now:
            self._hold(sched, room, req)

    def abort_all(self, sched: Scheduler, message: str) -> list[Request]:
        reqs = self.inflight
        self.prealloc.clear()
        for room in list(self.transfer):
            self._cancel(sched, room)
        for req in reqs:
            sched.finish_external(req, FinishReason("abort", message=message))
        return reqs

    def close(self) -> None:
        self.receiver.close()

