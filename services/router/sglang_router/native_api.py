"""SGLang's native ``/generate``: ``{text | input_ids, sampling_params, stream, return_logprob,
top_logprobs_num, logprob_start_len}`` -> ``{text, output_ids, meta_info}``.

As in SGLang: a single prompt with ``n == 1`` answers one object, a batch (a list of texts or of id
lists) or ``n > 1`` a list (prompt-major: prompt ``i``, sample ``j`` at ``i * n + j``). Streaming
sends ``data: {...}`` events with the cumulative ``text`` and ``output_ids`` of one output (plus
``index`` for batches), then ``data: [DONE]``. Logprobs use SGLang's tuples
``[logprob, token_id, text-or-null]``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

from aiohttp import web
from pydantic import Field
from sglang.engine.tokenizer import Tokenizer
from sglang.transport.types import LogprobEntry

from sglang_router.errors import bad_request
from sglang_router.models import ModelCatalog
from sglang_router.openai_protocol import _Body, parse_body
from sglang_router.request_flow import PreparedRequest, RequestFlow, SampleResult, SampleUpdate, collect
from sglang_router.sse import stream_events

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams default


class GenerateRequest(_Body):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int | None = Field(default=None, ge=-1)
    top_logprobs_num: int = Field(default=0, ge=0, le=20)
    return_text_in_logprobs: bool = False
    rid: str | None = Field(default=None, min_length=1, max_length=200)
    model: str | None = None

    def prompts(self, tok: Tokenizer) -> tuple[list[list[int]], bool, str]:
        """(token ids per prompt, is a batch, the field they came from)."""
        if (self.text is None) == (self.input_ids is None):
            raise bad_request("pass exactly one of text or input_ids", "text")
        if self.text is not None:
            texts = [self.text] if isinstance(self.text, str) else self.text
            if not texts or any(not t for t in texts):
                raise bad_request("text must be a non-empty string or list of strings", "text")
            return [tok.encode(t) for t in texts], isinstance(self.text, list), "text"
        ids = self.input_ids or []
        if ids and isinstance(ids[0], list):
            return [list(x) for x in ids], True, "input_ids"  # type: ignore[arg-type]
        return [list(ids)], False, "input_ids"  # type: ignore[arg-type]


def _logprobs(tok: Tokenizer, entries: Sequence[LogprobEntry], with_text: bool) -> tuple[list[Any], list[Any]]:
    def t(tid: int) -> str | None:
        return tok.decode([tid], skip_special_tokens=False) if with_text else None

    tokens = [[lp, tid, t(tid)] for lp, tid, _ in entries]
    tops = [[[v, x, t(x)] for v, x in top] if top is not None else None for _, _, top in entries]
    return tokens, tops


def _output(
    req: PreparedRequest, r: SampleResult, body: GenerateRequest, tok: Tokenizer, arrival: float
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": f"{req.request_id}-{r.index}" if len(req.samples) > 1 else req.request_id,
        "prompt_tokens": r.prompt_tokens or len(req.samples[r.index].input_ids),
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
        "finish_reason": r.finish_reason,
        "e2e_latency": time.monotonic() - arrival,
        "worker_id": r.worker_id,
    }
    if req.return_logprob:
        meta["output_token_logprobs"], tops = _logprobs(tok, r.logprobs, body.return_text_in_logprobs)
        meta["input_token_logprobs"], in_tops = _logprobs(tok, r.input_logprobs, body.return_text_in_logprobs)
        if req.top_logprobs_num > 0:
            meta["output_top_logprobs"], meta["input_top_logprobs"] = tops, in_tops
    return {"text": r.text, "output_ids": list(r.output_ids), "meta_info": meta}


class NativeHandlers:
    def __init__(self, flow: RequestFlow, catalog: ModelCatalog) -> None:
        self.flow = flow
        self.catalog = catalog

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = parse_body(GenerateRequest, await request.read())
        model = await self.catalog.get(body.model)
        tok = model.tokenizer
        prompts, is_batch, field = body.prompts(tok)
        start = body.logprob_start_len
        req = self.flow.prepare(
            model, prompts, body.sampling_params, prompt_param=field,
            default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS, return_logprob=body.return_logprob,
            top_logprobs_num=body.top_logprobs_num, logprob_start_len=None if start in (None, -1) else start,
            request_id=body.rid,
        )
        many = is_batch or len(req.samples) > 1
        arrival = time.monotonic()
        async with contextlib.aclosing(self.flow.stream(req)) as updates:
            if not body.stream:
                results = await collect(updates, len(req.samples))
                outs = [_output(req, r, body, tok, arrival) for r in results]
                return web.json_response(outs if many else outs[0])

            acc = [SampleResult(i) for i in range(len(req.samples))]

            def render(u: SampleUpdate) -> Iterable[dict[str, Any]]:
                acc[u.index].add(u)
                out = _output(req, acc[u.index], body, tok, arrival)
                if many:
                    out["index"] = u.index
                yield out

            return await stream_events(request, updates, render)
