"""The router service: settings -> wire up -> serve -> drain on SIGTERM.

    registry (Redis) ─▶ Discovery ─▶ ModelCatalog (tokenizers)
                                   ─▶ RequestFlow ◀─ policy
                     HttpApi, gRPC Router ──▶ RequestFlow ──▶ WorkerClient per worker

Liveness is ``/live`` (and gRPC health ``liveness``); readiness is ``/health`` (``/ready``, gRPC
health ``""``): at least one routable worker whose model's tokenizer is loaded. On SIGTERM/SIGINT
readiness flips to not-ready, new requests get 503, in-flight ones run for up to
``drain_timeout_s`` (a second signal cuts that short), then the servers stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import redis.asyncio as aioredis
from sglang.cluster.registry import WorkerRegistry
from sglang.observability.metrics import RouterMetrics
from sglang.settings.router import RouterSettings

from sglang_router.discovery import Discovery
from sglang_router.http_api import HttpApi
from sglang_router.models import ModelCatalog
from sglang_router.policies import create_policy
from sglang_router.request_flow import RequestFlow

logger = logging.getLogger("sglang_router")

READY_POLL_S = 0.2


async def main(settings: RouterSettings | None = None) -> None:
    settings = settings or RouterSettings()
    # ---- wire up
    metrics = RouterMetrics()
    redis = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=3.0, socket_timeout=5.0)
    registry = WorkerRegistry(redis, prefix=settings.redis_prefix)
    discovery = Discovery(registry, settings, metrics)
    catalog = ModelCatalog(settings, discovery)
    policy = create_policy(settings, redis)
    discovery.on_removed.append(policy.remove_worker)
    flow = RequestFlow(settings, discovery, policy, metrics)
    http = HttpApi(settings, flow, catalog, discovery, metrics)
    grpc_server = None
    if settings.grpc_port != 0:
        from sglang.transport.router_service import add_router_service
        from sglang.transport.server import GrpcServer

        from sglang_router.grpc_api import GrpcBackend

        grpc_server = GrpcServer(settings.host, max(settings.grpc_port, 0))
        grpc_server.add_service_name(add_router_service(grpc_server.server, GrpcBackend(flow, catalog)))

    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        logger.info("%s received%s", name, "; skipping the drain" if stop.is_set() else "")
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    # ---- serve
    catalog.preload()
    await discovery.start()
    await http.start()
    if grpc_server is not None:
        await grpc_server.start()
    grpc_desc = grpc_server.addr if grpc_server is not None else "off"
    print(f"sglang_router ready http=http://{settings.host}:{http.port} grpc={grpc_desc}", flush=True)
    logger.info("policy=%s shared_index=%s redis=%s", settings.policy, settings.shared_index, settings.redis_url)
    readiness = asyncio.create_task(_follow_readiness(http, grpc_server, stop), name="readiness")
    try:
        await stop.wait()
    finally:
        # ---- drain
        logger.info("stopping: draining %d in-flight requests (up to %gs)", flow.inflight, settings.drain_timeout_s)
        http.draining = True
        flow.draining = True
        stop.set()
        await readiness
        if grpc_server is not None:
            await grpc_server.set_ready(False)
        deadline = loop.time() + settings.drain_timeout_s
        while flow.inflight and loop.time() < deadline and not force.is_set():
            await asyncio.sleep(0.05)
        if grpc_server is not None:
            await grpc_server.stop(grace_s=1.0)
        await http.stop()
        await catalog.close()
        await discovery.stop()
        await policy.close()
        await redis.aclose()
        logger.info("router stopped")


async def _follow_readiness(http: HttpApi, grpc_server: object | None, stop: asyncio.Event) -> None:
    """Keep model loading going and mirror HTTP readiness into gRPC health until ``stop`` is set."""
    last = None
    while not stop.is_set():
        http.catalog.ensure_loading()
        ready = http.ready
        if ready != last and grpc_server is not None:
            await grpc_server.set_ready(ready)  # type: ignore[attr-defined]
        if ready != last:
            logger.info("readiness: %s", "ready" if ready else "not ready")
        last = ready
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), READY_POLL_S)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
