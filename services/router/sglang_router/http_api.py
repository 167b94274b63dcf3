"""The router's HTTP server (aiohttp): OpenAI API, SGLang's native API, health and metrics.

Routes:
    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /v1/models/{model}
    POST /generate              GET /get_model_info (with ``chat_roles``: see ``chat_role_markers``)
    GET /health (readiness: 200 with >= 1 routable worker and its tokenizer loaded, else 503)
    GET /ready (same)  GET /live (liveness: 200 while the process serves)
    GET /health_generate (one 1-token generation through a worker)   GET /metrics (Prometheus)

Every error is OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``), 503s carry
``Retry-After``. With an API key, every route except health, liveness, readiness and metrics needs
``Authorization: Bearer <key>``. A client that disconnects cancels its handler
(``handler_cancellation``), which cancels the worker streams and so aborts the request on the worker.
Nothing on the handler's path may swallow that cancellation: no ``asyncio.wait_for`` there (on
Python 3.11 it drops a cancel that lands as its inner await completes); use ``asyncio.timeout``.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sglang.engine.tokenizer.chat import chat_role_markers
from sglang.observability.metrics import RouterMetrics
from sglang.settings.router import RouterSettings

from sglang_router.discovery import Discovery
from sglang_router.errors import RouterError
from sglang_router.models import ModelCatalog, UnknownModel
from sglang_router.native_api import NativeHandlers
from sglang_router.openai_api import OpenAIHandlers
from sglang_router.request_flow import RequestFlow, collect

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/health_generate", "/live", "/ready", "/metrics"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(e: RouterError) -> web.Response:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return web.json_response(e.body(), status=e.status, headers=headers)


class HttpApi:
    """Owns the aiohttp application and its runner. ``start()`` binds (``port`` is then the real
    port); ``stop()`` closes the listener and waits for handlers up to the drain timeout."""

    def __init__(
        self,
        settings: RouterSettings,
        flow: RequestFlow,
        catalog: ModelCatalog,
        discovery: Discovery,
        metrics: RouterMetrics,
    ) -> None:
        self.settings = settings
        self.flow = flow
        self.catalog = catalog
        self.discovery = discovery
        self.metrics = metrics
        self.draining = False
        self.port = 0
        self._runner: web.AppRunner | None = None
        openai = OpenAIHandlers(flow, catalog)
        native = NativeHandlers(flow, catalog)
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", openai.chat)
        app.router.add_post("/v1/completions", openai.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/generate", native.generate)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.health)
        app.router.add_get("/live", self.live)
        app.router.add_get("/health_generate", self.health_generate)
        app.router.add_get("/metrics", self.metrics_handler)
        self.app = app

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._runner = web.AppRunner(
            # In-flight requests are drained by the router itself before cleanup; what aiohttp still
            # holds then is idle keep-alive connections, which must not delay the exit.
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ middleware

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
        try:
            if self.settings.api_key and request.path not in OPEN_PATHS:
                self._check_key(request)
            resp = await handler(request)
        except RouterError as e:
            if e.status >= 500:
                logger.warning("%s %s -> %d %s", request.method, request.path, e.status, e.message)
            resp = error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = error_response(RouterError(e.status, e.reason or "error", code=e.status))
        except (ConnectionResetError, ConnectionError) as e:
            logger.info("client of %s went away: %s", request.path, e)
            raise
        except Exception as e:
            logger.exception("%s %s failed", request.method, request.path)
            resp = error_response(RouterError(500, f"internal error: {type(e).__name__}: {e}"))
        self.metrics.http_requests_total.labels(route, str(resp.status)).inc()
        return resp

    def _check_key(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        key = self.settings.api_key or ""
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RouterError(
                401, "Incorrect or missing API key; send Authorization: Bearer <key>",
                type="invalid_request_error", code="invalid_api_key",
            )

    # ------------------------------------------------------------------ models

    def _model_card(self, name: str) -> dict[str, Any]:
        workers = self.discovery.routable(name)
        state = self.catalog.states.get(name)
        ctx = state.context_length if state else max((w.record.context_length for w in workers), default=0)
        return {
            "id": name,
            "object": "model",
            "created": state.created if state else int(time.time()),
            "owned_by": "sglang",
            "root": workers[0].record.model_path if workers else name,
            "max_model_len": ctx,
            "num_workers": len(workers),
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card(n) for n in self.catalog.served_names()]})

    async def model(self, request: web.Request) -> web.Response:
        try:
            name = self.catalog.resolve(request.match_info["model"])
        except UnknownModel as e:
            raise RouterError(404, e.message, param="model", code="model_not_found") from None
        return web.json_response(self._model_card(name))

    async def model_info(self, request: web.Request) -> web.Response:
        state = await self.catalog.get(request.query.get("model"))
        try:  # what the frontend language's RuntimeEndpoint writes around sgl.system/user/assistant
            roles = chat_role_markers(state.tokenizer)
        except ValueError:
            roles = None
        return web.json_response({
            "model_path": state.model_path, "tokenizer_path": state.tokenizer.path, "is_generation": True,
            "served_model_name": state.name, "context_length": state.context_length, "chat_roles": roles,
        })

    # ------------------------------------------------------------------ health and metrics

    @property
    def ready(self) -> bool:
        return not self.draining and self.discovery.num_routable > 0 and self.catalog.ready

    async def health(self, request: web.Request) -> web.Response:
        body = {
            "status": "ok" if self.ready else ("draining" if self.draining else "unavailable"),
            "workers": self.discovery.num_routable,
            "models": [n for n in self.catalog.served_names() if n in self.catalog.states],
        }
        headers = None if self.ready else {"Retry-After": str(self.settings.retry_after_s)}
        return web.json_response(body, status=200 if self.ready else 503, headers=headers)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def health_generate(self, request: web.Request) -> web.Response:
        if not self.ready:
            return await self.health(request)
        state = await self.catalog.get(None)
        ids = state.tokenizer.encode("hi") or [0]
        req = self.flow.prepare(state, [ids], {"max_new_tokens": 1, "temperature": 0.0})
        async with contextlib.aclosing(self.flow.stream(req)) as updates:
            results = await collect(updates, len(req.samples))
        return web.json_response({"status": "ok", "worker_id": results[0].worker_id})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(self.metrics.registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp
