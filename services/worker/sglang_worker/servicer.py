"""The ``sglang.v1.Worker`` gRPC servicer over one :class:`sglang.Engine`.

Generate contract (what the router relies on):

* the engine runs the request as a stream of cumulative snapshots; each snapshot's new tokens go
  out as one ``chunk`` (``stream=true`` only), then exactly one ``complete`` (finish reason, usage,
  the new tokens of the last step -- or every token when ``stream=false`` -- and logprobs) or one
  ``error``; the RPC itself then ends OK;
* bad input (the engine's ``ValueError``, ``n != 1``, a request id already in flight) is an
  ``error`` with code 400 and the offending ``param``; not ready or draining is 503; anything else
  500. None of them is a gRPC failure, and the worker keeps serving;
* when the client goes away (cancel, deadline, broken connection) the handler is cancelled and
  the request is aborted in the engine, which frees its KV pages;
* ``Abort`` ends a request in flight: its stream completes with ``finish_reason.type == "abort"``.

Roles: ``Generate`` is served by ``role=unified`` workers, ``Prefill`` by ``role=prefill`` and
``Decode`` by ``role=decode`` (PD disaggregation; ``bootstrap_room`` required). Any other pairing
is an ``error`` with code 400 and param ``role`` naming the RPC this worker serves.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from sglang.observability.metrics import WorkerMetrics
from sglang.transport import convert
from sglang.transport.types import GenerateEvent, GenerateInput
from sglang.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

_KNOWN_PARAMS = set(convert.SAMPLING_FIELDS) | {
    "input_ids", "request_id", "logprob_start_len", "top_logprobs_num", "return_logprob", "bootstrap_room",
}
_QUOTED = re.compile(r"'(\w+)'")


def error_param(message: str) -> str:
    """The parameter an engine ``ValueError`` is about (its messages start with the name)."""
    if message.startswith(("unknown sampling parameter", "sampling parameter")):
        m = _QUOTED.search(message)
        return m.group(1) if m else "sampling_params"
    if message.startswith(("prompt has", "prompt is", "pass exactly one of prompt")):
        return "input_ids"
    first = re.split(r"[\s,:]", message, maxsplit=1)[0]
    if first in _KNOWN_PARAMS:
        return first
    if message.startswith("at most one of regex"):
        return "regex"
    return ""


def _error(rid: str, code: int, message: str, param: str = "") -> worker_pb2.GenerateResponse:
    return convert.event_to_proto(
        GenerateEvent(kind="error", request_id=rid, error_code=code, error_message=message, error_param=param)
    )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Contract: construct before the engine exists (the server starts while the model loads),
    then :meth:`attach` it. :meth:`start_draining` refuses new Generate calls (503) and
    :meth:`wait_idle` waits for those in flight."""

    def __init__(self, info: dict[str, Any], metrics: WorkerMetrics | None = None) -> None:
        self.engine: Any = None  # sglang.Engine, typed loosely so importing this stays cheap
        self.info = dict(info)  # ModelInfo fields known before loading (role, served name)
        self.metrics = metrics
        self.draining = False
        self.inflight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.generated_tokens = 0  # for the throughput gauge

    def attach(self, engine: Any) -> None:
        runner = engine.runner
        self.info.update(
            model_path=str(engine.model_path),
            architecture=runner.info.architecture,
            context_length=runner.context_length,
            vocab_size=runner.info.vocab_size,
            page_size=runner.page_size,
            dtype=str(runner.dtype).removeprefix("torch."),
            eos_token_ids=list(engine.eos_token_ids),
            max_total_tokens=runner.max_total_tokens,
        )
        self.engine = engine

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True when nothing is in flight within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def abort_all(self) -> None:
        for rid in list(self.inflight):
            self.engine.abort(rid)

    # ---- Generate, Prefill, Decode -----------------------------------------------------------
    async def Generate(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        async for msg in self._serve("unified", request, context):
            yield msg

    async def Prefill(  # noqa: N802
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        async for msg in self._serve("prefill", request, context):
            yield msg

    async def Decode(  # noqa: N802
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        async for msg in self._serve("decode", request, context):
            yield msg

    def _role_error(self, rid: str, wanted: str, request: worker_pb2.GenerateRequest) -> worker_pb2.GenerateResponse | None:
        role = self.info.get("role", "unified")
        rpc = {"unified": "Generate", "prefill": "Prefill", "decode": "Decode"}
        if role != wanted:
            return _error(
                rid, 400, f"this worker has role {role!r} and serves {rpc[role]} only; {rpc[wanted]} needs a "
                f"{wanted!r} worker", "role",
            )
        if wanted != "unified" and not request.HasField("bootstrap_room"):
            return _error(rid, 400, f"bootstrap_room is required by {rpc[wanted]}", "bootstrap_room")
        if wanted == "unified" and request.HasField("bootstrap_room"):
            return _error(rid, 400, "bootstrap_room is only for Prefill and Decode (PD workers)", "bootstrap_room")
        return None

    async def _serve(
        self, wanted: str, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        wrong = self._role_error(rid, wanted, request)
        if wrong is not None:
            yield wrong
            return
        if self.engine is None or self.draining:
            state = "draining" if self.draining else "loading its model"
            yield _error(rid, 503, f"worker is {state}; retry on another worker")
            return
        inp = convert.generate_input_from_proto(request)
        if inp.sampling_params.get("n", 1) != 1:
            yield _error(rid, 400, "n must be 1 on a worker (the router fans out n > 1)", "n")
            return
        if rid in self.inflight:
            yield _error(rid, 400, f"request_id {rid!r} is already in flight", "request_id")
            return
        self.inflight.add(rid)
        self._idle.clear()
        engine = self.engine

        def on_done(_: object) -> None:  # also covers a handler that is never resumed
            if rid in self.inflight:
                engine.abort(rid)

        context.add_done_callback(on_done)
        try:
            async for msg in self._run(rid, inp):
                yield msg
        finally:
            self.inflight.discard(rid)
            if not self.inflight:
                self._idle.set()

    async def _run(self, rid: str, inp: GenerateInput) -> AsyncIterator[worker_pb2.GenerateResponse]:
        start = time.perf_counter()
        try:
            stream = await self.engine.async_generate(
                input_ids=inp.input_ids, sampling_params=inp.sampling_params, stream=True,
                return_logprob=inp.return_logprob, logprob_start_len=inp.logprob_start_len,
                top_logprobs_num=inp.top_logprobs_num, rid=rid, bootstrap_room=inp.bootstrap_room,
            )
        except ValueError as e:
            yield _error(rid, 400, str(e), error_param(str(e)))
            return
        except RuntimeError as e:  # the engine is shutting down
            yield _error(rid, 503, str(e))
            return
        sent = 0
        last_t: float | None = None
        finished = False
        try:
            async for snap in stream:
                out_ids: list[int] = snap["output_ids"]
                meta: dict[str, Any] = snap["meta_info"]
                now = time.perf_counter()
                new = len(out_ids) - sent
                if new > 0:
                    self._observe_tokens(start, last_t, now, new)
                    last_t = now
                if meta["finish_reason"] is None:
                    if inp.stream and new > 0:
                        yield convert.event_to_proto(self._event("chunk", rid, inp, snap, sent))
                        sent = len(out_ids)
                    continue
                finished = True
                yield convert.event_to_proto(self._event("complete", rid, inp, snap, sent if inp.stream else 0))
                self._observe_finish(start, meta)
                return
        except Exception as e:  # an engine bug must not kill the RPC without a result
            logger.exception("Generate %s failed", rid)
            yield _error(rid, 500, f"internal error: {e}")
        finally:
            if not finished:
                # The client went away (cancellation lands here as CancelledError) or we failed.
                self.engine.abort(rid)
                if self.metrics is not None:
                    self.metrics.child(self.metrics.num_aborted_requests_total).inc()  # type: ignore[union-attr]
            await stream.aclose()

    def _event(self, kind: str, rid: str, inp: GenerateInput, snap: dict[str, Any], since: int) -> GenerateEvent:
        meta = snap["meta_info"]
        ev = GenerateEvent(
            kind=kind,  # type: ignore[arg-type]
            request_id=rid,
            token_ids=list(snap["output_ids"][since:]),
            prompt_tokens=meta["prompt_tokens"],
            completion_tokens=meta["completion_tokens"],
            cached_tokens=meta["cached_tokens"],
        )
        if inp.return_logprob:
            tops = meta.get("output_top_logprobs")
            ev.output_logprobs = convert.logprob_entries(
                meta.get("output_token_logprobs", [])[since:], tops[since:] if tops else None
            )
            if kind == "complete":
                ev.input_logprobs = convert.logprob_entries(
                    meta.get("input_token_logprobs", []), meta.get("input_top_logprobs")
                )
        if kind == "complete":
            ev.finish_reason = meta["finish_reason"]
        return ev

    def _observe_tokens(self, start: float, last_t: float | None, now: float, new: int) -> None:
        self.generated_tokens += new
        m = self.metrics
        if m is None:
            return
        if last_t is None:
            m.child(m.time_to_first_token_seconds).observe(now - start)  # type: ignore[union-attr]
            new -= 1
            last_t = now
        itl = m.child(m.inter_token_latency_seconds)
        for _ in range(new):  # tokens of one snapshot arrived together: spread the gap evenly
            itl.observe((now - last_t) / max(new, 1))  # type: ignore[union-attr]

    def _observe_finish(self, start: float, meta: dict[str, Any]) -> None:
        m = self.metrics
        if m is None:
            return
        m.child(m.e2e_request_latency_seconds).observe(time.perf_counter() - start)  # type: ignore[union-attr]
        m.child(m.prompt_tokens_total).inc(meta["prompt_tokens"])  # type: ignore[union-attr]
        m.child(m.generation_tokens_total).inc(meta["completion_tokens"])  # type: ignore[union-attr]
        m.child(m.cached_tokens_total).inc(meta["cached_tokens"])  # type: ignore[union-attr]
        m.child(m.num_requests_total).inc()  # type: ignore[union-attr]
        if (meta["finish_reason"] or {}).get("type") == "abort":
            m.child(m.num_aborted_requests_total).inc()  # type: ignore[union-attr]

    # ---- unary RPCs -------------------------------------------------------------------------
    async def _require_engine(self, context: grpc.aio.ServicerContext) -> Any:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is loading its model")
        return self.engine

    async def Abort(  # noqa: N802
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        engine = await self._require_engine(context)
        found = request.request_id in self.inflight
        if found:
            engine.abort(request.request_id)
        return worker_pb2.AbortResponse(found=found)

    async def GetLoad(  # noqa: N802
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.Load:
        engine = await self._require_engine(context)
        return convert.load_to_proto(await asyncio.to_thread(engine.get_stats))

    async def GetModelInfo(  # noqa: N802
        self, request: worker_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ModelInfo:
        await self._require_engine(context)
        return convert.model_info_to_proto(self.info)

    async def FlushCache(  # noqa: N802
        self, request: worker_pb2.FlushCacheRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.FlushCacheResponse:
        engine = await self._require_engine(context)
        return worker_pb2.FlushCacheResponse(flushed=await asyncio.to_thread(engine.flush_cache))
