"""The Router gRPC service in plain Python types: the server side adapter and a client.

The router implements :class:`RouterBackend` with plain dataclasses; :func:`add_router_service`
puts it behind ``sglang.v1.Router`` on a ``grpc.aio`` server, and :class:`RouterClient` calls it
(tests, benchmarks, other services). Nothing outside ``sglang.transport`` sees proto classes.

Stream contract of ``Generate``: for each output ``index`` (prompt-major, ``n`` samples per prompt)
zero or more ``chunk`` events with new text and token ids, then one ``complete`` carrying the last
new text when streaming (the full text otherwise), all output ids, finish reason, usage and the
worker that served it; or a single ``error`` (then the stream ends).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import grpc

from sglang.transport import convert
from sglang.transport.server import DEFAULT_OPTIONS
from sglang.v1 import common_pb2, router_pb2, router_pb2_grpc

SERVICE_NAME = "sglang.v1.Router"


@dataclass
class RouterGenerateInput:
    model: str = ""
    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None  # {"role", "content"}, rendered with the chat template
    sampling_params: dict[str, Any] = field(default_factory=dict)  # SGLang names
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass
class RouterEvent:
    kind: Literal["chunk", "complete", "error"]
    request_id: str = ""
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # chunk: new ids; complete: every output id
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str = ""
    error_code: int = 0
    error_message: str = ""
    error_param: str = ""
    error_type: str = ""


class RouterBackend(Protocol):
    def generate(self, inp: RouterGenerateInput) -> AsyncIterator[RouterEvent]: ...

    async def list_models(self) -> list[dict[str, Any]]: ...  # id, context_length, num_workers


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def input_to_proto(inp: RouterGenerateInput) -> router_pb2.RouterGenerateRequest:
    msg = router_pb2.RouterGenerateRequest(
        model=inp.model,
        sampling_params=convert.sampling_params_to_proto(inp.sampling_params),
        stream=inp.stream,
        return_logprob=inp.return_logprob,
        top_logprobs_num=inp.top_logprobs_num,
    )
    if inp.text is not None:
        msg.text = inp.text
    elif inp.input_ids is not None:
        msg.input_ids.CopyFrom(common_pb2.TokenIds(ids=inp.input_ids))
    elif inp.messages is not None:
        msg.messages.CopyFrom(router_pb2.ChatMessages(messages=[
            router_pb2.ChatMessage(role=str(m.get("role", "")), content=str(m.get("content") or ""))
            for m in inp.messages
        ]))
    return msg


def input_from_proto(msg: router_pb2.RouterGenerateRequest) -> RouterGenerateInput:
    """Raises ``convert.InvalidParam`` (a ValueError naming the field) on bad sampling params."""
    inp = RouterGenerateInput(
        model=msg.model,
        sampling_params=convert.sampling_params_from_proto(msg.sampling_params),
        stream=msg.stream,
        return_logprob=msg.return_logprob,
        top_logprobs_num=msg.top_logprobs_num,
    )
    which = msg.WhichOneof("input")
    if which == "text":
        inp.text = msg.text
    elif which == "input_ids":
        inp.input_ids = list(msg.input_ids.ids)
    elif which == "messages":
        inp.messages = [{"role": m.role, "content": m.content} for m in msg.messages.messages]
    return inp


def event_to_proto(ev: RouterEvent) -> router_pb2.RouterGenerateResponse:
    msg = router_pb2.RouterGenerateResponse(request_id=ev.request_id)
    if ev.kind == "chunk":
        msg.chunk.CopyFrom(router_pb2.RouterChunk(index=ev.index, text=ev.text, token_ids=ev.token_ids))
    elif ev.kind == "complete":
        msg.complete.CopyFrom(router_pb2.RouterComplete(
            index=ev.index, text=ev.text, output_ids=ev.token_ids,
            finish_reason=convert.finish_reason_to_proto(ev.finish_reason or {}),
            usage=common_pb2.Usage(
                prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens, cached_tokens=ev.cached_tokens
            ),
            worker_id=ev.worker_id,
        ))
    else:
        msg.error.CopyFrom(common_pb2.Error(
            code=ev.error_code, message=ev.error_message, param=ev.error_param, type=ev.error_type
        ))
    return msg


def event_from_proto(msg: router_pb2.RouterGenerateResponse) -> RouterEvent:
    which = msg.WhichOneof("response")
    if which == "chunk":
        c = msg.chunk
        return RouterEvent("chunk", msg.request_id, c.index, c.text, list(c.token_ids))
    if which == "complete":
        d = msg.complete
        return RouterEvent(
            "complete", msg.request_id, d.index, d.text, list(d.output_ids),
            convert.finish_reason_from_proto(d.finish_reason), d.usage.prompt_tokens,
            d.usage.completion_tokens, d.usage.cached_tokens, d.worker_id,
        )
    e = msg.error
    return RouterEvent(
        "error", msg.request_id, error_code=e.code, error_message=e.message, error_param=e.param, error_type=e.type
    )


# ---------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------


class _Servicer(router_pb2_grpc.RouterServicer):
    def __init__(self, backend: RouterBackend) -> None:
        self.backend = backend

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: router_pb2.RouterGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        try:
            inp = input_from_proto(request)
        except convert.InvalidParam as e:
            yield event_to_proto(RouterEvent(
                "error", error_code=400, error_message=str(e), error_param=e.param, error_type="invalid_request_error"
            ))
            return
        async with contextlib.aclosing(self.backend.generate(inp)) as events:  # type: ignore[type-var]
            async for ev in events:
                yield event_to_proto(ev)

    async def ListModels(  # noqa: N802
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        models = await self.backend.list_models()
        return router_pb2.ListModelsResponse(models=[
            router_pb2.Model(id=m["id"], context_length=int(m.get("context_length", 0)),
                             num_workers=int(m.get("num_workers", 0)))
            for m in models
        ])


def add_router_service(server: grpc.aio.Server, backend: RouterBackend) -> str:
    """Serve ``backend`` as ``sglang.v1.Router`` on ``server``; returns the service name."""
    router_pb2_grpc.add_RouterServicer_to_server(_Servicer(backend), server)
    return SERVICE_NAME


# ---------------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------------


class RouterClient:
    """Calls a router's gRPC service. ``generate`` raises ``grpc.aio.AioRpcError`` on transport
    failure; request errors arrive as ``error`` events."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self._channel = grpc.aio.insecure_channel(addr, options=list(DEFAULT_OPTIONS))
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    async def generate(self, inp: RouterGenerateInput, *, timeout_s: float | None = None) -> AsyncIterator[RouterEvent]:
        call = self._stub.Generate(input_to_proto(inp), timeout=timeout_s)
        try:
            async for msg in call:
                yield event_from_proto(msg)
        finally:
            call.cancel()

    async def list_models(self, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        resp = await self._stub.ListModels(router_pb2.ListModelsRequest(), timeout=timeout_s)
        return [{"id": m.id, "context_length": m.context_length, "num_workers": m.num_workers} for m in resp.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
