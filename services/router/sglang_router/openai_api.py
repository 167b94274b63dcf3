"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``: request -> prepared request
-> response objects (``chat.completion``, ``chat.completion.chunk``, ``text_completion``) as the
OpenAI API shapes them, plus SGLang's ``matched_stop`` on each choice.

Tokenization runs on the event loop, never in a thread: an HF fast tokenizer used from two threads
at once can fail ("Already borrowed"), and the loop also detokenizes with it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any

from aiohttp import web
from sglang.engine.tokenizer import Tokenizer
from sglang.transport.types import LogprobEntry

from sglang_router.errors import RouterError, bad_request
from sglang_router.models import ModelCatalog, ModelState
from sglang_router.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_body
from sglang_router.request_flow import PreparedRequest, RequestFlow, SampleResult, SampleUpdate, collect
from sglang_router.sse import stream_events

OPENAI_PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "top_logprobs_num": "top_logprobs"}


def finish_reason(fr: dict[str, Any] | None) -> str | None:
    return None if fr is None else str(fr.get("type") or "stop")


def matched_stop(fr: dict[str, Any] | None) -> Any:
    return None if fr is None else fr.get("matched")


def token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, entries: Sequence[LogprobEntry]) -> dict[str, Any]:
    content = []
    for lp, tid, top in entries:
        s = token_text(tok, tid)
        item: dict[str, Any] = {"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
        for tlp, ttid in top or []:
            ts = token_text(tok, ttid)
            item["top_logprobs"].append({"token": ts, "logprob": tlp, "bytes": list(ts.encode())})
        content.append(item)
    return {"content": content}


def completion_logprobs(tok: Tokenizer, entries: Sequence[LogprobEntry], offset: int = 0) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp, tid, top in entries:
        s = token_text(tok, tid)
        tokens.append(s)
        token_lps.append(lp)
        tops.append({token_text(tok, t): v for v, t in top} if top else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def usage(req: PreparedRequest, results: Iterable[SampleResult | SampleUpdate]) -> dict[str, Any]:
    """Prompt tokens once per prompt (not per sample), completion tokens of every sample."""
    prompt = {s.prompt_index: len(s.input_ids) for s in req.samples}
    cached: dict[int, int] = {}
    completion = 0
    for r in results:
        p = req.samples[r.index].prompt_index
        cached[p] = max(cached.get(p, 0), r.cached_tokens)
        completion += r.completion_tokens
    total_prompt = sum(prompt.values())
    return {
        "prompt_tokens": total_prompt,
        "completion_tokens": completion,
        "total_tokens": total_prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
    }


async def api_param_errors(
    updates: AsyncGenerator[SampleUpdate, None], names: dict[str, str]
) -> AsyncGenerator[SampleUpdate, None]:
    """``updates``, with a worker's error about an SGLang parameter renamed to the API field the
    client set (``json_schema`` -> ``response_format``). Closes ``updates`` when closed."""
    async with contextlib.aclosing(updates):
        try:
            async for u in updates:
                yield u
        except RouterError as e:
            api = names.get(e.param or "")
            if api is not None and e.param is not None:
                e.message = re.sub(rf"\b{re.escape(e.param)}\b", api, e.message)
                e.param = api
            raise


class OpenAIHandlers:
    def __init__(self, flow: RequestFlow, catalog: ModelCatalog) -> None:
        self.flow = flow
        self.catalog = catalog

    async def _model(self, name: str | None) -> ModelState:
        return await self.catalog.get(name)

    # ------------------------------------------------------------------ chat

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = parse_body(ChatCompletionRequest, await request.read())
        body.check()
        model = await self._model(body.model)
        messages = body.template_messages()
        kwargs = dict(body.chat_template_kwargs or {})

        try:
            ids = model.tokenizer.encode_chat(messages, tools=body.tools, **kwargs)
        except Exception as e:  # no template, or the template rejects the conversation
            raise bad_request(f"cannot apply the chat template: {e}", "messages") from None
        # response_format arrives at the worker as json_schema; its errors name the field set here.
        fmt = {"json_schema": "response_format"} if body.response_format and body.response_format.type != "text" else {}
        req = self.flow.prepare(
            model, [ids], body.sampling_params(), prompt_param="messages", param_names={**OPENAI_PARAM_NAMES, **fmt},
            default_max_new_tokens=None, return_logprob=body.logprobs,
            top_logprobs_num=body.top_logprobs or 0,
        )
        rid, created, name = f"chatcmpl-{req.request_id}", int(time.time()), body.model or model.name
        tok = model.tokenizer

        def base(obj: str) -> dict[str, Any]:
            return {"id": rid, "object": obj, "created": created, "model": name}

        async with contextlib.aclosing(api_param_errors(self.flow.stream(req), fmt)) as updates:
            if not body.stream:
                results = await collect(updates, len(req.samples))
                choices = [
                    {
                        "index": r.index,
                        "message": {"role": "assistant", "content": r.text},
                        "logprobs": chat_logprobs(tok, r.logprobs) if body.logprobs else None,
                        "finish_reason": finish_reason(r.finish_reason),
                        "matched_stop": matched_stop(r.finish_reason),
                    }
                    for r in results
                ]
                return web.json_response({**base("chat.completion"), "choices": choices, "usage": usage(req, results)})

            finals: list[SampleUpdate] = []
            extra = {"usage": None} if body.include_usage else {}

            def head() -> Iterable[dict[str, Any]]:
                for i in range(len(req.samples)):
                    delta = {"role": "assistant", "content": ""}
                    yield {**base("chat.completion.chunk"), "choices": [
                        {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}], **extra}

            def render(u: SampleUpdate) -> Iterable[dict[str, Any]]:
                if u.text or (body.logprobs and u.logprobs):
                    lps = chat_logprobs(tok, u.logprobs) if body.logprobs else None
                    yield {**base("chat.completion.chunk"), "choices": [
                        {"index": u.index, "delta": {"content": u.text}, "logprobs": lps, "finish_reason": None}], **extra}
                if u.finish_reason is not None:
                    finals.append(u)
                    yield {**base("chat.completion.chunk"), "choices": [{
                        "index": u.index, "delta": {}, "logprobs": None,
                        "finish_reason": finish_reason(u.finish_reason), "matched_stop": matched_stop(u.finish_reason),
                    }], **extra}

            def tail() -> Iterable[dict[str, Any]]:
                if body.include_usage:
                    yield {**base("chat.completion.chunk"), "choices": [], "usage": usage(req, finals)}

            return await stream_events(request, updates, render, head, tail)

    # ------------------------------------------------------------------ completions

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_body(CompletionRequest, await request.read())
        body.check()
        model = await self._model(body.model)
        tok = model.tokenizer
        prompts: list[list[int]] = []
        echoes: list[str] = []
        for p in body.prompts():
            if isinstance(p, str):
                prompts.append(tok.encode(p))
                echoes.append(p)
            else:
                prompts.append(p)
                echoes.append(tok.decode(p) if body.echo else "")
        want_lp = body.logprobs is not None
        req = self.flow.prepare(
            model, prompts, body.sampling_params(), prompt_param="prompt", param_names=OPENAI_PARAM_NAMES,
            default_max_new_tokens=16, return_logprob=want_lp, top_logprobs_num=body.logprobs or 0,
        )
        rid, created, name = f"cmpl-{req.request_id}", int(time.time()), body.model or model.name

        def base() -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": name}

        def echo(index: int) -> str:
            return echoes[req.samples[index].prompt_index] if body.echo else ""

        async with contextlib.aclosing(self.flow.stream(req)) as updates:
            if not body.stream:
                results = await collect(updates, len(req.samples))
                choices = [
                    {
                        "index": r.index,
                        "text": echo(r.index) + r.text,
                        "logprobs": completion_logprobs(tok, r.logprobs) if want_lp else None,
                        "finish_reason": finish_reason(r.finish_reason),
                        "matched_stop": matched_stop(r.finish_reason),
                    }
                    for r in results
                ]
                return web.json_response({**base(), "choices": choices, "usage": usage(req, results)})

            finals: list[SampleUpdate] = []
            offsets = [0] * len(req.samples)
            started = [False] * len(req.samples)
            extra = {"usage": None} if body.include_usage else {}

            def render(u: SampleUpdate) -> Iterable[dict[str, Any]]:
                text = u.text
                if not started[u.index]:
                    started[u.index] = True
                    text = echo(u.index) + text
                if text or (want_lp and u.logprobs):
                    lps = completion_logprobs(tok, u.logprobs, offsets[u.index]) if want_lp else None
                    offsets[u.index] += len(u.text)
                    yield {**base(), "choices": [
                        {"index": u.index, "text": text, "logprobs": lps, "finish_reason": None}], **extra}
                if u.finish_reason is not None:
                    finals.append(u)
                    yield {**base(), "choices": [{
                        "index": u.index, "text": "", "logprobs": None,
                        "finish_reason": finish_reason(u.finish_reason), "matched_stop": matched_stop(u.finish_reason),
                    }], **extra}

            def tail() -> Iterable[dict[str, Any]]:
                if body.include_usage:
                    yield {**base(), "choices": [], "usage": usage(req, finals)}

            return await stream_events(request, updates, render, tail=tail)
