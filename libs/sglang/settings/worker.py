"""The worker service: where it listens, how it registers, how it drains.

Engine settings (model, cache, scheduler) are the other classes of this package; the worker's
command line exposes both.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_worker_id() -> str:
    """``hostname-pid-random``: unique per process, readable in logs and Redis."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class WorkerSettings(BaseSettings):
    """One worker process. Env: ``SGLANG_WORKER_PORT``, ``SGLANG_WORKER_REDIS_URL`` etc."""

    model_config = SettingsConfigDict(
        env_prefix="SGLANG_WORKER_", extra="ignore", validate_assignment=True, use_attribute_docstrings=True
    )

    host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    """Address the gRPC server (and /metrics) binds; ``0.0.0.0`` to accept remote routers."""

    port: int = Field(default=0, ge=0, le=65535)
    """gRPC port; 0 lets the OS pick a free one (printed in the readiness line)."""

    advertise_host: str | None = Field(default=None, min_length=1, max_length=255)
    """Host written into the registry for routers to dial. None: ``host``, or this machine's
    hostname when ``host`` is a wildcard (``0.0.0.0``/``::``)."""

    role: Literal["unified", "prefill", "decode"] = "unified"
    """``unified`` does prefill and decode (RPC ``Generate``). ``prefill``/``decode`` split them
    across workers (PD disaggregation, RPCs ``Prefill``/``Decode``): the engine runs with
    ``disaggregation_mode`` = the role, its KV agent is named ``worker_id`` and meets its peers in
    ``redis_url`` (both required for these roles; ``--kv-transfer-*`` flags override)."""

    worker_id: str = Field(default_factory=default_worker_id, min_length=1, max_length=200, pattern=r"^[\w.:@-]+$")
    """Unique id in the registry and in the KV event stream name. Default: hostname-pid-random."""

    served_model_name: str | None = Field(default=None, min_length=1, max_length=200)
    """Model name clients pass as ``model``. None: the model folder's base name."""

    redis_url: str | None = Field(default=None, min_length=1, pattern=r"^(redis|rediss|unix)://")
    """Registry and KV events (``redis://host:port/db``). None: run standalone, register nowhere."""

    redis_prefix: str = Field(default="sglang", min_length=1, max_length=64, pattern=r"^[\w.-]+$")
    """Key prefix in Redis: ``{prefix}:worker:{id}``, ``{prefix}:workers``, ``{prefix}:kv_events:{id}``."""

    heartbeat_interval_s: float = Field(default=1.0, gt=0.0, le=60.0)
    """Seconds between registry refreshes (with the current load)."""

    heartbeat_ttl_s: float = Field(default=3.0, gt=0.0, le=600.0)
    """Lifetime of the registry record; a worker that stops heart-beating vanishes after this.
    Must exceed ``heartbeat_interval_s``."""

    kv_events: bool = True
    """Forward prefix-cache events to the Redis stream ``{prefix}:kv_events:{worker_id}``
    (needs ``redis_url``), for cache-aware routing."""

    kv_events_maxlen: int = Field(default=10_000, ge=100, le=10_000_000)
    """Approximate length bound of the KV event stream (XADD MAXLEN ~)."""

    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus ``/metrics`` on ``host:metrics_port``. None: off; 0: a free port (printed
    in the readiness line)."""

    drain_timeout_s: float = Field(default=30.0, ge=0.0, le=3600.0)
    """On SIGTERM, how long in-flight requests may run before they are aborted."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level (logs go to stderr)."""

    @model_validator(mode="after")
    def _pd_needs_redis(self) -> WorkerSettings:
        if self.role != "unified" and self.redis_url is None:
            raise ValueError(
                f"role={self.role!r} needs redis_url: prefill and decode workers exchange KV transfer "
                "metadata and register through Redis"
            )
        return self

    @model_validator(mode="after")
    def _ttl_exceeds_interval(self) -> WorkerSettings:
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_ttl_s ({self.heartbeat_ttl_s}) must be greater than heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or the record expires between heartbeats"
            )
        return self

    def registry_host(self) -> str:
        """The host routers should dial."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", "[::]"):
            return socket.gethostname()
        return self.host
