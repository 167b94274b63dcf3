"""Client of one worker's gRPC service, in plain Python types (no proto classes leak out).

    client = WorkerClient("127.0.0.1:50051")
    async with contextlib.aclosing(client.generate(inp)) as events:
        async for ev in events:        # GenerateEvent: chunk*, then one complete or error
            ...
    await client.close()

``prefill(inp)`` / ``decode(inp)`` are the same for the PD RPCs (``inp.bootstrap_room`` set).

Contract:

* One channel per client, opened lazily on first use and shared by every call; at most
  ``max_in_flight`` calls run at once (more wait), because a channel fails calls past a few
  thousand in flight.
* Transport failures raise :class:`WorkerUnavailable` (UNAVAILABLE, deadline exceeded, a stream
  that breaks or ends without ``complete``/``error``, any other non-OK status). Request-level
  errors (bad input 400, draining 503) are *not* exceptions: they arrive as an ``error`` event.
* Leaving the ``generate`` iterator early (break, ``aclose()``, task cancellation) cancels the
  RPC; the worker then aborts the request and frees its KV pages. Use ``contextlib.aclosing`` to
  make that immediate rather than at garbage collection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sglang.transport import convert
from sglang.transport.server import DEFAULT_OPTIONS
from sglang.transport.types import GenerateEvent, GenerateInput, WorkerUnavailable
from sglang.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)


class WorkerClient:
    def __init__(
        self,
        addr: str,
        *,
        rpc_timeout_s: float = 10.0,
        generate_timeout_s: float | None = None,
        max_in_flight: int = 1024,
    ) -> None:
        """``addr`` is ``host:port``. ``rpc_timeout_s`` bounds unary calls; ``generate_timeout_s``
        (None: no deadline) bounds a whole Generate stream."""
        self.addr = addr
        self.rpc_timeout_s = rpc_timeout_s
        self.generate_timeout_s = generate_timeout_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._channel: grpc.aio.Channel | None = None
        self._stub: worker_pb2_grpc.WorkerStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None

    def _stubs(self) -> tuple[worker_pb2_grpc.WorkerStub, health_pb2_grpc.HealthStub]:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.addr, options=list(DEFAULT_OPTIONS))
            self._stub = worker_pb2_grpc.WorkerStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
        assert self._stub is not None and self._health is not None
        return self._stub, self._health

    def _unavailable(self, what: str, e: grpc.aio.AioRpcError) -> WorkerUnavailable:
        return WorkerUnavailable(f"worker {self.addr} {what}: {e.code().name} {e.details() or ''}".rstrip())

    def generate(
        self, inp: GenerateInput, *, timeout_s: float | None = None
    ) -> AsyncGenerator[GenerateEvent, None]:
        """Stream the events of one request (``inp.n`` must be 1). Raises ``InvalidParam`` before
        sending when ``inp`` cannot be encoded, ``WorkerUnavailable`` on transport failure."""
        return self._stream("Generate", inp, timeout_s)

    def prefill(
        self, inp: GenerateInput, *, timeout_s: float | None = None
    ) -> AsyncGenerator[GenerateEvent, None]:
        """PD, on a prefill worker: like :meth:`generate`; ``inp.bootstrap_room`` is required. The
        stream completes with ``token_ids == [first_token]`` once the KV pages were written to the
        decode worker, or with ``finish_reason["type"] == "abort"`` when the transfer failed."""
        if inp.bootstrap_room is None:
            raise ValueError("prefill needs inp.bootstrap_room")
        return self._stream("Prefill", inp, timeout_s)

    def decode(
        self, inp: GenerateInput, *, timeout_s: float | None = None
    ) -> AsyncGenerator[GenerateEvent, None]:
        """PD, on a decode worker: like :meth:`generate` (the first token is the prefill's);
        ``inp.bootstrap_room`` is required."""
        if inp.bootstrap_room is None:
            raise ValueError("decode needs inp.bootstrap_room")
        return self._stream("Decode", inp, timeout_s)

    async def _stream(
        self, rpc: str, inp: GenerateInput, timeout_s: float | None
    ) -> AsyncGenerator[GenerateEvent, None]:
        request = convert.generate_input_to_proto(inp)
        stub, _ = self._stubs()
        timeout = timeout_s if timeout_s is not None else self.generate_timeout_s
        async with self._slots:
            call = getattr(stub, rpc)(request, timeout=timeout)
            ended = False
            try:
                async for msg in call:
                    ev = convert.event_from_proto(msg)
                    ended = ev.kind != "chunk"
                    yield ev
                    if ended:
                        return
            except grpc.aio.AioRpcError as e:
                raise self._unavailable(f"{rpc} {inp.request_id!r} failed", e) from e
            finally:
                if not ended:
                    call.cancel()
            raise WorkerUnavailable(f"worker {self.addr} ended {rpc} {inp.request_id!r} without a result")

    async def _unary(self, name: str, request: Any, timeout_s: float | None) -> Any:
        stub, _ = self._stubs()
        async with self._slots:
            try:
                return await getattr(stub, name)(request, timeout=timeout_s or self.rpc_timeout_s)
            except grpc.aio.AioRpcError as e:
                raise self._unavailable(f"{name} failed", e) from e

    async def abort(self, request_id: str, *, timeout_s: float | None = None) -> bool:
        """Abort a request; True when the worker had it in flight (its stream then completes with
        ``finish_reason`` ``{"type": "abort"}``)."""
        resp = await self._unary("Abort", worker_pb2.AbortRequest(request_id=request_id), timeout_s)
        return bool(resp.found)

    async def get_load(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``num_running_reqs, num_waiting_reqs, token_usage, cache_hit_rate, num_used_pages,
        num_total_pages, num_cached_pages`` and the PD queues ``num_prefill_inflight_queue_reqs,
        num_decode_prealloc_queue_reqs, num_decode_transfer_queue_reqs``."""
        return convert.load_from_proto(await self._unary("GetLoad", worker_pb2.GetLoadRequest(), timeout_s))

    async def get_model_info(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``model_path, served_model_name, architecture, context_length, vocab_size, page_size,
        dtype, role, eos_token_ids, max_total_tokens``."""
        msg = await self._unary("GetModelInfo", worker_pb2.GetModelInfoRequest(), timeout_s)
        return convert.model_info_from_proto(msg)

    async def flush_cache(self, *, timeout_s: float | None = None) -> bool:
        """Empty the worker's prefix cache; False while it has requests running."""
        resp = await self._unary("FlushCache", worker_pb2.FlushCacheRequest(), timeout_s)
        return bool(resp.flushed)

    async def health(self, service: str = "", *, timeout_s: float = 2.0) -> bool:
        """True when the worker answers grpc.health.v1 Check(``service``) with SERVING (``""``:
        ready for new work; ``"liveness"``: the process is up). Never raises."""
        _, health = self._stubs()
        try:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._stub = self._health = None
            await channel.close()

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
