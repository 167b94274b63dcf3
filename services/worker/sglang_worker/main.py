"""Wire the worker up: settings -> gRPC server (not ready) -> engine -> metrics, KV events,
heartbeat -> ready -> wait for SIGTERM/SIGINT -> drain -> exit 0.

Drain order: readiness NOT_SERVING and ``draining=True`` in Redis (routers stop sending), new
Generate calls get 503, in-flight requests run up to ``drain_timeout_s`` (then are aborted), the
record is deleted, the server stops, the engine shuts down. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from sglang.cluster.kv_events import RedisKVEventForwarder
from sglang.cluster.registry import WorkerRecord, WorkerRegistry
from sglang.observability.metrics import WorkerMetrics
from sglang.transport.server import GrpcServer, format_addr
from sglang.v1 import worker_pb2_grpc

from sglang_worker.args import parse_args
from sglang_worker.heartbeat import Heartbeat
from sglang_worker.monitor import LoadMonitor
from sglang_worker.servicer import WorkerServicer

logger = logging.getLogger("sglang_worker")
READY_LINE = "sglang_worker ready grpc={grpc} metrics={metrics} worker_id={worker_id}"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _start_metrics(host: str, port: int, metrics: WorkerMetrics) -> tuple[Any, threading.Thread, str]:
    from prometheus_client import start_http_server

    httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return httpd, thread, format_addr(host, httpd.server_port)


def _default_served_name(engine_kwargs: dict[str, Any]) -> str:
    """The model folder's name (``--model-path``, else ``SGLANG_MODEL_PATH``, else the default model)."""
    from sglang.settings import ModelSettings

    path = engine_kwargs.get("model_path") or ModelSettings().model_path
    if not path:
        from sglang.engine.models.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return os.path.basename(str(path).rstrip("/"))


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = args.settings
    _setup_logging(s.log_level)
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signame: str) -> None:
        logger.info("%s received%s", signame, "; draining" if not stop.is_set() else "; aborting in-flight requests")
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    redis: aioredis.Redis | None = None
    if s.redis_url:
        redis = aioredis.Redis.from_url(s.redis_url, socket_connect_timeout=3.0, socket_timeout=5.0)
        try:
            await redis.ping()
        except (aioredis.RedisError, OSError) as e:
            logger.error("cannot reach Redis at %s: %s", s.redis_url, e)
            await redis.aclose()
            return 1

    servicer = WorkerServicer({"role": s.role})
    server = GrpcServer(s.host, s.port)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server.server)
    server.add_service_name("sglang.v1.Worker")
    try:
        await server.start()  # liveness SERVING, readiness NOT_SERVING while the model loads
    except RuntimeError as e:
        logger.error("%s (is the port in use?)", e)
        if redis is not None:
            await redis.aclose()
        return 1

    served = s.served_model_name or _default_served_name(args.engine_kwargs)
    metrics = WorkerMetrics(labels={"model_name": served, "worker_id": s.worker_id})
    servicer.metrics = metrics
    servicer.info["served_model_name"] = served
    metrics_http: tuple[Any, threading.Thread, str] | None = None
    if s.metrics_port is not None:
        try:
            metrics_http = _start_metrics(s.host, s.metrics_port, metrics)
        except OSError as e:
            logger.error("cannot serve /metrics on %s: %s", format_addr(s.host, s.metrics_port), e)
            await server.stop(0)
            if redis is not None:
                await redis.aclose()
            return 1

    try:
        from sglang.engine.engine import Engine

        logger.info("loading the model (%s)", args.engine_kwargs.get("model_path") or "default model")
        engine = await asyncio.to_thread(lambda: Engine(**args.engine_kwargs))
    except Exception:
        logger.exception("loading the engine failed")
        await server.stop(0)
        if metrics_http is not None:
            metrics_http[0].shutdown()
            metrics_http[0].server_close()
        if redis is not None:
            await redis.aclose()
        return 1
    servicer.attach(engine)

    bg_stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    def keep(coro: Coroutine[Any, Any, Any], name: str) -> None:
        tasks.append(asyncio.create_task(coro, name=name))

    monitor = LoadMonitor(
        engine.get_stats, s.heartbeat_interval_s, engine.scheduler_settings.max_running_requests,
        metrics, lambda: servicer.generated_tokens,
    )
    keep(monitor.run(bg_stop), "load-monitor")

    forwarder: RedisKVEventForwarder | None = None
    unsubscribe = None
    heartbeat: Heartbeat | None = None
    if redis is not None:
        if s.kv_events:
            forwarder = RedisKVEventForwarder(redis, s.worker_id, loop, s.redis_prefix, s.kv_events_maxlen)
            unsubscribe = engine.kv_events.subscribe(forwarder.on_batch)
            keep(forwarder.run(), "kv-events")
        record = WorkerRecord(
            worker_id=s.worker_id,
            grpc_addr=format_addr(s.registry_host(), server.port),
            role=s.role,
            model=served,
            model_path=str(engine.model_path),
            context_length=engine.runner.context_length,
            page_size=engine.runner.page_size,
            metrics_addr=format_addr(s.registry_host(), metrics_http[0].server_port) if metrics_http else "",
        )
        registry = WorkerRegistry(redis, s.redis_prefix, s.heartbeat_ttl_s)
        heartbeat = Heartbeat(registry, record, lambda: monitor.load, s.heartbeat_interval_s)
        await monitor.poll()
        await heartbeat.beat()
        keep(heartbeat.run(bg_stop), "heartbeat")

    if not stop.is_set():  # a signal during loading goes straight to the drain
        await server.set_ready(True)
        line = READY_LINE.format(
            grpc=server.addr, metrics=metrics_http[2] if metrics_http else "off", worker_id=s.worker_id
        )
        print(line, flush=True)
        logger.info("serving %s as %s on %s", served, s.worker_id, server.addr)

    # ---- serve until a signal (or a background task dies) ----
    stop_wait = asyncio.create_task(stop.wait(), name="wait-for-signal")
    done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    status = 0
    for t in done:
        if t is not stop_wait:
            status = 1  # a background task must not end on its own
            logger.error("background task %s ended early: %r", t.get_name(), None if t.cancelled() else t.exception())
    await stop_wait

    # ---- drain ----
    await server.set_ready(False)
    servicer.start_draining()
    if heartbeat is not None:
        await heartbeat.drain()
    n = len(servicer.inflight)
    logger.info("draining: %d request(s) in flight, waiting up to %.1fs", n, s.drain_timeout_s)
    force_wait = asyncio.create_task(force.wait(), name="wait-for-second-signal")
    idle_wait = asyncio.create_task(servicer.wait_idle(s.drain_timeout_s), name="wait-idle")
    await asyncio.wait([force_wait, idle_wait], return_when=asyncio.FIRST_COMPLETED)
    force_wait.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await force_wait
    if not (idle_wait.done() and idle_wait.result()):
        logger.warning("aborting %d request(s) still in flight", len(servicer.inflight))
        servicer.abort_all()
    await idle_wait
    await servicer.wait_idle(5.0)

    bg_stop.set()
    if unsubscribe is not None:
        unsubscribe()
    if forwarder is not None:
        forwarder.stop()
    for t, result in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True):
        if isinstance(result, BaseException):
            logger.error("background task %s failed: %r", t.get_name(), result)
    if heartbeat is not None:
        await heartbeat.deregister()
    await server.stop(grace_s=1.0)
    if metrics_http is not None:
        metrics_http[0].shutdown()
        metrics_http[0].server_close()
        metrics_http[1].join(timeout=5)
    await asyncio.to_thread(engine.shutdown)
    if redis is not None:
        await redis.aclose()
    logger.info("worker %s stopped", s.worker_id)
    return status
