"""Prefill/decode disaggregation inside the scheduler.

Prefill side: a request carrying a ``bootstrap_room`` is prefilled as usual (chunked, with its
prefix cache). After every chunk, its completed pages are written to the decode worker's pages
for that room (once the decode side has published them); when the first token is sampled the
request leaves the running batch, the remaining pages go out with the first token as the last
chunk, and the request finishes once every write completed. Its pages stay pinned (never
retracted, never swapped for cached duplicates) until then.

Decode side: a request waits in the *prealloc* queue until pages for its whole prompt can be
reserved, publishes those pages for its room, waits in the *transfer* queue for the KV, then
joins the running batch with ``num_computed = len(prompt)`` and the first token appended, so the
prompt is never recomputed. A room that fails or times out frees its pages and finishes with an
abort; so does an abort from the client.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from sglang.engine.memory import OutOfPagesError
from sglang.engine.scheduler.request import FinishReason, Request

if TYPE_CHECKING:
    from sglang.engine.scheduler.scheduler import Scheduler
    from sglang.kv_transfer.base import KVReceiver, KVSender

logger = logging.getLogger(__name__)


class PrefillSide:
    def __init__(self, sender: KVSender, page_size: int, timeout_s: float) -> None:
        self.sender = sender
        self.page_size = page_size
        self.timeout_s = timeout_s
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

    def after_chunk(self, req: Request) -> None:
        """Send the whole pages this chunk completed, when the destination is known."""
        dest = self.sender.dest(req.bootstrap_room)  # type: ignore[arg-type]
        if dest is None:
            return
        full = req.num_computed // self.page_size
        if full > req.pd_sent_pages:
            self._send(req, dest.pages, req.pd_sent_pages, full, last=False)

    def on_prefilled(self, sched: Scheduler, req: Request, reason: FinishReason | None) -> None:
        """First token sampled: leave the running batch and send the rest with it."""
        sched.running.remove(req)
        req.pd_deadline = time.monotonic() + self.timeout_s
        req.pd_finish = reason or FinishReason("length")
        self.awaiting_dest[req.bootstrap_room] = req  # type: ignore[index]
        self._try_last(req)

    def _try_last(self, req: Request) -> bool:
        room = req.bootstrap_room
        assert room is not None
        dest = self.sender.dest(room)
        if dest is None:
            return False
        total = -(-len(req.prompt_ids) // self.page_size)
        if len(dest.pages) != total:
            raise ValueError(f"room {room}: decode reserved {len(dest.pages)} pages, prefill has {total}")
        aux = {
            "first_token": req.output_ids[0],
            "logprob": req.output_token_logprobs[0][0] if req.output_token_logprobs else None,
            "cached_tokens": req.cached_tokens,
        }
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
            except ValueError as e:
                self._fail(sched, room, req, str(e))
                done.append(req)
                continue
            if now > req.pd_deadline:
                self._fail(sched, room, req, f"decode side never published pages for room {room} in {self.timeout_s}s")
                done.append(req)
        for room, ok, err in self.sender.poll():
            sent = self.sending.pop(room, None)
            if sent is None:
                continue
            if ok:
                sched.finish_external(sent, sent.pd_finish or FinishReason("length"))
            else:
                sched.finish_external(sent, FinishReason("abort", message=f"KV transfer failed: {err}"))
            done.append(sent)
        for room, req in list(self.sending.items()):
            if now > req.pd_deadline + self.timeout_s:
                self.sending.pop(room)
                self.sender.cancel(room)
                sched.finish_external(req, FinishReason("abort", message="KV transfer timed out"))
                done.append(req)
        return done

    def _fail(self, sched: Scheduler, room: int, req: Request, msg: str) -> None:
        self.awaiting_dest.pop(room, None)
        self.sending.pop(room, None)
        self.sender.cancel(room)
        sched.finish_external(req, FinishReason("abort", message=msg))

    def abort(self, sched: Scheduler, req: Request) -> bool:
        room = req.bootstrap_room
        if room in self.awaiting_dest or room in self.sending:
            self._fail(sched, room, req, "aborted by the client")  # type: ignore[arg-type]
            return True
        return False


class DecodeSide:
    def __init__(self, receiver: KVReceiver) -> None:
        self.receiver = receiver
        self.prealloc: deque[Request] = deque()
        self.transfer: dict[int, Request] = {}

    @property
    def inflight(self) -> list[Request]:
        return list(self.prealloc) + list(self.transfer.values())

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
            self.receiver.publish(req.bootstrap_room, list(req.pages))  # type: ignore[arg-type]
            self.transfer[req.bootstrap_room] = req  # type: ignore[index]
        for res in self.receiver.poll():
            got = self.transfer.pop(res.room, None)
            if got is None:
                continue
            updated.append(got)
            if not res.ok or not res.aux:
                sched.finish_external(got, FinishReason("abort", message=f"KV transfer failed: {res.error}"))
                continue
            got.num_computed = len(got.prompt_ids)
            got.cached_tokens = int(res.aux.get("cached_tokens") or 0)
            sched.admit_prefilled(got, int(res.aux["first_token"]), res.aux.get("logprob"))
        return updated

    def abort(self, sched: Scheduler, req: Request) -> bool:
        if req in self.prealloc:
            self.prealloc.remove(req)
        elif self.transfer.get(req.bootstrap_room) is req:  # type: ignore[arg-type]
            del self.transfer[req.bootstrap_room]  # type: ignore[arg-type]
            self.receiver.cancel(req.bootstrap_room)  # type: ignore[arg-type]
        else:
            return False
        sched.finish_external(req, FinishReason("abort", message="aborted by the client"))
        return True

