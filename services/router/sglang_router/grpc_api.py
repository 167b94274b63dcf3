"""The router's gRPC front door: ``sglang.v1.Router`` (``Generate`` streaming, ``ListModels``).

The same request path as HTTP (chat template for ``messages``, the tokenizer for ``text``, ids as
given), the same validation and errors: a :class:`RouterError` becomes an ``error`` event with its
HTTP-like code, message and param. ``transport.router_service`` does the proto conversion.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from sglang.transport.router_service import RouterEvent, RouterGenerateInput

from sglang_router.errors import RouterError, bad_request
from sglang_router.models import ModelCatalog
from sglang_router.request_flow import RequestFlow, SampleResult, collect

DEFAULT_MAX_NEW_TOKENS = 128


def _error(e: RouterError, request_id: str = "") -> RouterEvent:
    return RouterEvent(
        "error", request_id, error_code=e.status, error_message=e.message, error_param=e.param or "",
        error_type=e.type,
    )


def _complete(request_id: str, r: SampleResult, text: str) -> RouterEvent:
    return RouterEvent(
        "complete", request_id, r.index, text, list(r.output_ids), r.finish_reason, r.prompt_tokens,
        r.completion_tokens, r.cached_tokens, r.worker_id,
    )


class GrpcBackend:
    """Implements ``transport.router_service.RouterBackend`` on the router's request flow."""

    def __init__(self, flow: RequestFlow, catalog: ModelCatalog) -> None:
        self.flow = flow
        self.catalog = catalog

    async def list_models(self) -> list[dict[str, Any]]:
        out = []
        for name in self.catalog.served_names():
            state = self.catalog.states.get(name)
            workers = self.flow.discovery.routable(name)
            ctx = state.context_length if state else max((w.record.context_length for w in workers), default=0)
            out.append({"id": name, "context_length": ctx, "num_workers": len(workers)})
        return out

    async def generate(self, inp: RouterGenerateInput) -> AsyncGenerator[RouterEvent, None]:
        request_id = ""
        try:
            model = await self.catalog.get(inp.model or None)
            tok = model.tokenizer
            if inp.messages is not None:
                try:
                    ids, param = tok.encode_chat(inp.messages), "messages"
                except Exception as e:
                    raise bad_request(f"cannot apply the chat template: {e}", "messages") from None
            elif inp.text is not None:
                ids, param = tok.encode(inp.text), "text"
            elif inp.input_ids is not None:
                ids, param = list(inp.input_ids), "input_ids"
            else:
                raise bad_request("set one of text, input_ids or messages", "input")
            default = None if inp.messages is not None else DEFAULT_MAX_NEW_TOKENS
            req = self.flow.prepare(
                model, [ids], inp.sampling_params, prompt_param=param, default_max_new_tokens=default,
                return_logprob=inp.return_logprob, top_logprobs_num=inp.top_logprobs_num,
            )
            request_id = req.request_id
            async with contextlib.aclosing(self.flow.stream(req)) as updates:
                if not inp.stream:
                    for r in await collect(updates, len(req.samples)):
                        yield _complete(request_id, r, r.text)
                    return
                acc = [SampleResult(i) for i in range(len(req.samples))]
                async for u in updates:
                    acc[u.index].add(u)
                    if u.finish_reason is not None:
                        yield _complete(request_id, acc[u.index], u.text)
                    elif u.text or u.token_ids:
                        yield RouterEvent("chunk", request_id, u.index, u.text, list(u.token_ids))
        except RouterError as e:
            yield _error(e, request_id)
