"""Server-sent events over aiohttp, with the status decided by the first update.

An HTTP status can only be sent before the body starts, so :func:`stream_events` waits for the
first update of the request before answering: a request that fails before producing anything (bad
input found by a worker, no worker, every worker full) gets a proper 4xx/5xx JSON answer. Once the
stream is open, a failure becomes a last ``data: {"error": {...}}`` event, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from aiohttp import web

from sglang_router.errors import RouterError

logger = logging.getLogger(__name__)

U = TypeVar("U")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_line(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def stream_events(
    request: web.Request,
    updates: AsyncIterator[U],
    render: Callable[[U], Iterable[dict[str, Any]]],
    head: Callable[[], Iterable[dict[str, Any]]] = lambda: (),
    tail: Callable[[], Iterable[dict[str, Any]]] = lambda: (),
) -> web.StreamResponse:
    """Answer ``request`` with SSE: ``head()`` events, ``render(u)`` for every update, ``tail()``
    events, ``[DONE]``. The caller owns (and closes) ``updates``."""
    try:
        first: U | None = await updates.__anext__()
    except StopAsyncIteration:
        first = None
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await resp.prepare(request)
    try:
        for ev in head():
            await resp.write(sse_line(ev))
        if first is not None:
            for ev in render(first):
                await resp.write(sse_line(ev))
            async for u in updates:
                for ev in render(u):
                    await resp.write(sse_line(ev))
        for ev in tail():
            await resp.write(sse_line(ev))
    except RouterError as e:
        logger.info("stream %s ended with an error: %s", request.path, e.message)
        await resp.write(sse_line(e.body()))
    await resp.write(sse_line("[DONE]"))
    await resp.write_eof()
    return resp
