"""A grpc.aio server with the standard ``grpc.health.v1`` service, for every service of the mesh.

Health names (what probes ask for):

* ``""``, ``"readiness"`` and each registered service name (e.g. ``"sglang.v1.Worker"``):
  **readiness**. NOT_SERVING while loading and while draining, SERVING when ready for new work.
  ``WorkerClient.health()`` and Kubernetes readiness probes check ``""``.
* ``"liveness"``: SERVING from :meth:`GrpcServer.start` until :meth:`GrpcServer.stop`, also while
  loading and draining (a pod that drains must not be killed for it).

Usage::

    srv = GrpcServer(host="127.0.0.1", port=0)          # 0: the OS picks a free port
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, srv.server)
    srv.add_service_name("sglang.v1.Worker")
    await srv.start()                                   # binds; srv.port is the real port
    await srv.set_ready(True)
    ...
    await srv.set_ready(False)                          # drain
    await srv.stop(grace_s=5.0)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "liveness"
READINESS = "readiness"

# Large enough for long prompts with logprobs; keepalive so dead peers are noticed on idle streams.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)


def format_addr(host: str, port: int) -> str:
    """``host:port``, with brackets for IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """Owns one ``grpc.aio.Server`` and its health servicer.

    Contract: add servicers to :attr:`server` before :meth:`start`; :meth:`start` binds (raises
    ``RuntimeError`` when the address is taken) and starts with readiness NOT_SERVING;
    :meth:`stop` first sets every health status to NOT_SERVING, then lets in-flight RPCs run for
    ``grace_s`` seconds before cancelling them. Not reusable after stop.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, options: Sequence[tuple[str, Any]] = DEFAULT_OPTIONS
    ) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self.server = grpc.aio.server(options=list(options))
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._readiness_names: list[str] = ["", READINESS]
        self._ready = False

    @property
    def addr(self) -> str:
        """``host:port`` actually bound (valid after :meth:`start`)."""
        return format_addr(self.host, self.port)

    def add_service_name(self, name: str) -> None:
        """Report ``name`` in health checks, following readiness."""
        if name not in self._readiness_names:
            self._readiness_names.append(name)

    async def start(self) -> None:
        port = self.server.add_insecure_port(format_addr(self.host, self.requested_port))
        if port == 0:
            raise RuntimeError(f"cannot bind gRPC to {format_addr(self.host, self.requested_port)}")
        self.port = port
        for name in self._readiness_names:
            await self.health.set(name, NOT_SERVING)
        await self.health.set(LIVENESS, SERVING)
        await self.server.start()
        logger.info("gRPC listening on %s", self.addr)

    @property
    def ready(self) -> bool:
        return self._ready

    async def set_ready(self, ready: bool) -> None:
        """Flip readiness for every readiness name; liveness is unchanged."""
        self._ready = ready
        status = SERVING if ready else NOT_SERVING
        for name in self._readiness_names:
            await self.health.set(name, status)

    async def set_live(self, live: bool) -> None:
        await self.health.set(LIVENESS, SERVING if live else NOT_SERVING)

    async def stop(self, grace_s: float | None = 5.0) -> None:
        self._ready = False
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        logger.info("gRPC server on %s stopped", self.addr)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()
