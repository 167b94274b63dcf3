"""One sample through a prefill/decode (PD) pair, SGLang's bootstrap-room flow.

When to use it: a model is served in PD mode when at least one routable ``prefill`` and one routable
``decode`` worker serve it; PD is then always preferred, and ``unified`` workers of that model only
take requests while no complete pair is available (see :meth:`PDFlow.enabled`; ``pd_mode=off``
routes to unified workers only).

One attempt:

1. pick a prefill worker with the router's policy (cache-aware by default: the prefix cache lives
   on the prefill side) and a decode worker by load (fewest running + queued + this router's
   in-flight requests, ties by id); draw a random 63-bit ``bootstrap_room``;
2. call both at once: ``Decode`` streams back to the client, ``Prefill`` (non-streaming) is
   consumed by a background task that is kept and awaited;
3. until the decode worker streams its first token, a failed prefill (an ``error``, a ``complete``
   with ``finish_reason`` abort, or the worker unreachable / killed) aborts the decode request
   (``Abort`` RPC, bounded by ``pd_abort_timeout_s``, and cancelling its stream) so its reserved
   pages are freed, and the sample is retried once on another prefill worker
   (``max_retries``) or ends with a clean 503 naming the prefill worker and the reason;
4. a failed decode (unreachable, ``error``, or aborted before its first token) aborts the prefill
   request the same way; retried like 3 when no token was streamed yet;
5. ``pd_timeout_s`` bounds the time from dispatch to the decode's first token (504, both aborted);
   after that only the request's own ``request_timeout_s`` applies. Once the decode finished, the
   prefill call is given ``pd_abort_timeout_s`` to report (it normally already has) and is then
   cancelled.

Each attempt uses its own request id (``<id>`` then ``<id>-r1``...) because the workers refuse an
id still in flight, and an aborted attempt may linger there for a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sglang.transport.types import GenerateEvent, GenerateInput, WorkerUnavailable

from sglang_router.discovery import WorkerHandle
from sglang_router.errors import RouterError
from sglang_router.sample_output import SampleDecoder, SampleUpdate

if TYPE_CHECKING:
    from sglang_router.request_flow import PreparedRequest, RequestFlow, Sample

logger = logging.getLogger(__name__)

ROOM_BITS = 63  # SGLang draws bootstrap rooms as random 63-bit integers


@dataclass
class PDFailure:
    """Why an attempt failed. ``stage`` is ``prefill``, ``decode`` or ``timeout``; ``retryable``
    failures are retried on another worker of that stage while no token was streamed."""

    stage: str
    error: RouterError
    worker_id: str
    retryable: bool = True


def _error(status: int, message: str, code: str, retry_after: int | None) -> RouterError:
    return RouterError(status, message, code=code, retry_after=retry_after if status == 503 else None)


class PDFlow:
    """PD routing for :class:`RequestFlow` (it owns the settings, discovery, policy and metrics)."""

    def __init__(self, flow: RequestFlow) -> None:
        self.flow = flow
        self.settings = flow.settings
        self.discovery = flow.discovery

    def enabled(self, model: str) -> bool:
        """PD mode: ``pd_mode=auto`` and at least one routable prefill and one routable decode
        worker for ``model``."""
        if self.settings.pd_mode == "off":
            return False
        return bool(self.discovery.routable(model, "prefill")) and bool(self.discovery.routable(model, "decode"))

    # ------------------------------------------------------------------ picking

    def pick_decode(self, model: str, tried: set[str]) -> WorkerHandle:
        retry_after = self.settings.retry_after_s
        workers = [h for h in self.discovery.routable(model, "decode") if h.worker_id not in tried]
        if not workers:
            what = "no other decode worker" if tried else "no decode worker"
            raise RouterError(503, f"{what} is available for model {model!r}", retry_after=retry_after)
        free = [
            h for h in workers
            if not h.at_capacity(self.settings.max_inflight_per_worker, self.settings.max_waiting_per_worker)
        ]
        if not free:
            raise RouterError(
                503, "every decode worker is at capacity; retry later", code="overloaded", retry_after=retry_after
            )
        return min(free, key=lambda h: (h.load, h.worker_id))

    # ------------------------------------------------------------------ one sample

    async def run(
        self, req: PreparedRequest, s: Sample, inp: GenerateInput, decoder: SampleDecoder,
        out: asyncio.Queue[SampleUpdate | RouterError],
    ) -> None:
        """Stream sample ``s`` through PD pairs until it finishes; raises :class:`RouterError`."""
        tried = {"prefill": set[str](), "decode": set[str]()}
        attempt = 0
        while True:
            prefill, decision = await self.flow.pick(req, s, tried["prefill"], role="prefill")
            decode = self.pick_decode(req.model.name, tried["decode"])
            rid = inp.request_id if attempt == 0 else f"{inp.request_id}-r{attempt}"
            one = dataclasses.replace(inp, request_id=rid, bootstrap_room=secrets.randbits(ROOM_BITS))
            m = self.flow.metrics
            m.requests_total.labels(prefill.worker_id, self.flow.policy.name, decision).inc()
            m.requests_total.labels(decode.worker_id, "pd_decode", "least_loaded").inc()
            failure = await self._attempt(req, one, prefill, decode, decoder, out)
            if failure is None:
                return
            m.pd_failures_total.labels(failure.stage).inc()
            tried[failure.stage if failure.stage in tried else "prefill"].add(failure.worker_id)
            can_retry = (
                failure.retryable and decoder.num_tokens == 0 and attempt < self.settings.max_retries
                and self._has_alternative(req.model.name, failure, tried)
            )
            if not can_retry:
                raise failure.error
            attempt += 1
            logger.info("request %s: %s; retrying with another %s worker", inp.request_id, failure.error.message,
                        failure.stage)

    def _has_alternative(self, model: str, failure: PDFailure, tried: dict[str, set[str]]) -> bool:
        stage = failure.stage if failure.stage in tried else "prefill"
        return any(h.worker_id not in tried[stage] for h in self.discovery.routable(model, stage))

    async def _attempt(
        self, req: PreparedRequest, inp: GenerateInput, prefill: WorkerHandle, decode: WorkerHandle,
        decoder: SampleDecoder, out: asyncio.Queue[SampleUpdate | RouterError],
    ) -> PDFailure | None:
        retry_after = self.settings.retry_after_s
        p_inp = dataclasses.replace(inp, stream=False)
        prefill_task = asyncio.create_task(self._prefill(prefill, p_inp), name=f"prefill-{inp.request_id}")
        deadline = time.monotonic() + self.settings.pd_timeout_s
        last = time.monotonic()
        try:
            with self.discovery.track(decode):
                stream = decode.client.decode(inp, timeout_s=None)
                async with contextlib.aclosing(stream) as events:
                    while True:
                        got = await self._next(events, prefill_task, decoder.num_tokens == 0, deadline)
                        if isinstance(got, PDFailure):  # prefill failed or timeout, before any token
                            await self._abort(decode, inp.request_id)
                            return got
                        if got is None:  # the decode stream ended without a result
                            raise WorkerUnavailable(f"worker {decode.worker_id} ended Decode without a result")
                        ev = got
                        if ev.kind == "error":
                            self.flow.metrics.upstream_errors_total.labels(decode.worker_id, str(ev.error_code)).inc()
                            await self._abort_prefill(prefill, prefill_task, inp.request_id)
                            code = ev.error_code or 500
                            err = RouterError(code, f"decode worker {decode.worker_id}: {ev.error_message}",
                                              param=ev.error_param or None,
                                              retry_after=retry_after if code == 503 else None)
                            return PDFailure("decode", err, decode.worker_id, retryable=code == 503)
                        aborted = ev.kind == "complete" and (ev.finish_reason or {}).get("type") == "abort"
                        if aborted and decoder.num_tokens == 0 and not ev.token_ids:
                            # Aborted before the KV arrived: the prefill side usually knows why.
                            return await self._decode_aborted(ev, prefill, prefill_task, decode, inp.request_id)
                        last = self.flow.observe_tokens(req, ev, decoder.num_tokens, last)
                        u = decoder.feed(ev, decode.worker_id)
                        if u.finish_reason is not None:
                            self.flow.metrics.prompt_tokens_total.inc(decoder.num_prompt_tokens)
                            await self._settle_prefill(prefill_task)
                            out.put_nowait(u)
                            return None
                        out.put_nowait(u)
        except WorkerUnavailable as e:
            self.discovery.mark_failed(decode.worker_id)
            self.flow.metrics.upstream_errors_total.labels(decode.worker_id, "unavailable").inc()
            await self._abort_prefill(prefill, prefill_task, inp.request_id)
            err = _error(503, f"decode worker {decode.worker_id} became unavailable: {e}", "worker_unavailable",
                         retry_after)
            return PDFailure("decode", err, decode.worker_id)
        finally:
            if not prefill_task.done():
                prefill_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prefill_task

    async def _next(
        self, events: AsyncGenerator[GenerateEvent, None], prefill_task: asyncio.Task[PDFailure | None],
        watch_prefill: bool, deadline: float,
    ) -> GenerateEvent | PDFailure | None:
        """The decode stream's next event; before its first token, a prefill failure or the PD
        deadline instead (the pending read is then cancelled, which cancels the Decode call)."""
        nxt: asyncio.Future[GenerateEvent] = asyncio.ensure_future(events.__anext__())
        try:
            while True:
                waits: set[asyncio.Future[Any]] = {nxt}
                if watch_prefill and not prefill_task.done():
                    waits.add(prefill_task)
                timeout = deadline - time.monotonic() if watch_prefill else None
                if timeout is not None and timeout <= 0:
                    err = RouterError(504, f"no first token from the PD pair within {self.settings.pd_timeout_s:g} s",
                                      code="timeout")
                    return PDFailure("timeout", err, "", retryable=False)
                done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if nxt in done:
                    try:
                        return nxt.result()
                    except StopAsyncIteration:
                        return None
                if prefill_task in done:
                    failure = prefill_task.result()
                    if failure is not None and watch_prefill:
                        return failure
        finally:
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, WorkerUnavailable):
                    await nxt

    async def _prefill(self, handle: WorkerHandle, inp: GenerateInput) -> PDFailure | None:
        """Run the Prefill call to its end: None when the KV went out, else why not."""
        retry_after = self.settings.retry_after_s
        wid = handle.worker_id
        try:
            with self.discovery.track(handle):
                stream = handle.client.prefill(inp, timeout_s=self.settings.pd_timeout_s)
                async with contextlib.aclosing(stream) as events:
                    async for ev in events:
                        if ev.kind == "error":
                            code = ev.error_code or 500
                            self.flow.metrics.upstream_errors_total.labels(wid, str(code)).inc()
                            err = RouterError(code, f"prefill worker {wid}: {ev.error_message}",
                                              param=ev.error_param or None,
                                              retry_after=retry_after if code == 503 else None)
                            return PDFailure("prefill", err, wid, retryable=code == 503)
                        if ev.kind == "complete":
                            reason = ev.finish_reason or {}
                            if reason.get("type") == "abort":
                                msg = reason.get("message") or "the request was aborted"
                                err = _error(503, f"prefill worker {wid}: {msg}", "kv_transfer_failed", retry_after)
                                return PDFailure("prefill", err, wid)
                            return None
        except WorkerUnavailable as e:
            self.discovery.mark_failed(wid)
            self.flow.metrics.upstream_errors_total.labels(wid, "unavailable").inc()
            return PDFailure("prefill", _error(503, f"prefill worker {wid} became unavailable: {e}",
                                               "worker_unavailable", retry_after), wid)
        return PDFailure("prefill", _error(503, f"prefill worker {wid} ended Prefill without a result",
                                           "worker_unavailable", retry_after), wid)

    async def _decode_aborted(
        self, ev: GenerateEvent, prefill: WorkerHandle, prefill_task: asyncio.Task[PDFailure | None],
        decode: WorkerHandle, rid: str,
    ) -> PDFailure:
        msg = (ev.finish_reason or {}).get("message") or "aborted"
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(self.settings.pd_abort_timeout_s):  # not wait_for (3.11 cancel race)
                p_failure = await asyncio.shield(prefill_task)
            if p_failure is not None:
                return p_failure  # the root cause (e.g. an incompatible KV layout)
        await self._abort_prefill(prefill, prefill_task, rid)
        err = _error(503, f"decode worker {decode.worker_id}: {msg}", "kv_transfer_failed", self.settings.retry_after_s)
        return PDFailure("decode", err, decode.worker_id)

    async def _settle_prefill(self, prefill_task: asyncio.Task[PDFailure | None]) -> None:
        """The decode finished: give the prefill call a moment to end by itself (it normally has)."""
        if not prefill_task.done():
            await asyncio.wait({prefill_task}, timeout=self.settings.pd_abort_timeout_s)

    async def _abort(self, handle: WorkerHandle, rid: str) -> None:
        """Best effort ``Abort`` RPC, bounded; the cancelled stream aborts the request as well."""
        try:
            await handle.client.abort(rid, timeout_s=self.settings.pd_abort_timeout_s)
        except (WorkerUnavailable, asyncio.TimeoutError) as e:
            logger.info("aborting %s on %s: %s", rid, handle.worker_id, e)

    async def _abort_prefill(self, handle: WorkerHandle, task: asyncio.Task[PDFailure | None], rid: str) -> None:
        if task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self._abort(handle, rid)
