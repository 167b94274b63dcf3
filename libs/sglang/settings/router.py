"""The router (front door): where it listens, how it finds workers and how it picks one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RouterSettings(BaseSettings):
    """HTTP + gRPC front door. Env: ``SGLANG_ROUTER_PORT``, ``SGLANG_ROUTER_POLICY`` etc.; the
    command line (``python -m sglang_router --help``) has one flag per field."""

    model_config = SettingsConfigDict(
        env_prefix="SGLANG_ROUTER_", extra="ignore", validate_assignment=True, use_attribute_docstrings=True
    )

    # ---- listening ---------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", min_length=1)
    """Address the HTTP and gRPC servers bind (0.0.0.0 in containers)."""

    port: int = Field(default=30000, ge=0, le=65535)
    """HTTP port (OpenAI API, /generate, /health, /metrics). 0 picks a free port (printed)."""

    grpc_port: int = Field(default=0, ge=-1, le=65535)
    """gRPC port of the Router service. 0 turns it off; -1 picks a free port (printed)."""

    # ---- discovery -----------------------------------------------------------------------------
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", min_length=1)
    """Redis holding the worker registry (and the shared prefix index)."""

    redis_prefix: str = Field(default="sglang", min_length=1, max_length=64, pattern=r"^[\w.-]+$")
    """Key prefix in Redis (registry, shared index); must match the workers' ``redis_prefix``."""

    discovery_interval_s: float = Field(default=0.5, ge=0.01, le=60.0)
    """How often the registry is read; workers appear and disappear within this delay."""

    # ---- model -----------------------------------------------------------------------------------
    model_path: str | None = Field(default=None, min_length=1)
    """Folder of the served model, for its tokenizer. None: the ``model_path`` a worker reports
    through GetModelInfo (the router must see the same files, as on one machine or a shared volume)."""

    tokenizer_path: str | None = Field(default=None, min_length=1)
    """Tokenizer folder when it differs from ``model_path``. Wins over ``model_path``."""

    # ---- policy ------------------------------------------------------------------------------------
    policy: Literal["round_robin", "power_of_two", "cache_aware"] = "cache_aware"
    """How a worker is picked for each request."""

    balance_abs_threshold: int = Field(default=64, ge=0, le=1_000_000)
    """cache_aware: load is imbalanced when max - min load exceeds this (and the relative test holds)."""

    balance_rel_threshold: float = Field(default=1.5, ge=1.0, le=1000.0)
    """cache_aware: load is imbalanced when max load exceeds this times the min load (and the absolute
    test holds)."""

    cache_threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    """cache_aware: route to the best prefix match only when matched/prompt tokens exceeds this."""

    max_tree_size: int = Field(default=1 << 20, ge=1, le=1 << 30)
    """cache_aware: most tokens kept in each worker's approximate radix tree (LRU leaves evicted)."""

    shared_index: bool = False
    """cache_aware: keep the prefix index in Redis so that several router replicas agree on where a
    prefix lives (chained hashes of token pages -> workers) instead of per-replica trees."""

    shared_index_page_size: int = Field(default=16, ge=1, le=4096)
    """Tokens per hashed page of the shared prefix index."""

    shared_index_max_entries: int = Field(default=1_000_000, ge=1, le=1 << 31)
    """Most (page, worker) entries in the shared index; the least recently routed go first."""

    shared_index_ttl_s: float = Field(default=3600.0, ge=1.0, le=30 * 86400.0)
    """A page of the shared index no router touched for this long expires."""

    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    """Seed of the power_of_two draws (None: random)."""

    # ---- requests ---------------------------------------------------------------------------------
    api_key: str | None = Field(default=None, min_length=1)
    """When set, every API route needs ``Authorization: Bearer <api_key>`` (health and metrics do not)."""

    request_timeout_s: float = Field(default=600.0, gt=0.0, le=86400.0)
    """Longest a request may take end to end; then it ends with a timeout error."""

    max_retries: int = Field(default=1, ge=0, le=10)
    """Times a request is sent to another worker when the chosen one is unavailable before any token
    was streamed (a worker that fails mid-stream ends the request with an error)."""

    pd_mode: Literal["auto", "off"] = "auto"
    """Prefill/decode disaggregation. ``auto``: a model with at least one routable ``prefill`` and
    one routable ``decode`` worker is served by such pairs (its ``unified`` workers then take requests
    only while no pair is available); ``off``: only ``unified`` workers are used."""

    pd_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    """PD mode: longest wait from sending a request to its prefill and decode workers until the
    decode worker streams the first token; then both are aborted and the client gets a 504."""

    pd_abort_timeout_s: float = Field(default=2.0, gt=0.0, le=60.0)
    """PD mode: bound on each Abort call to the other worker of a failed pair (its stream is cancelled
    too), and on how long a finished request waits for its prefill call to report."""

    max_inflight_per_worker: int = Field(default=1024, ge=1, le=1_000_000)
    """A worker with this many requests in flight from this router takes no more (503 when all do)."""

    max_waiting_per_worker: int = Field(default=512, ge=1, le=1_000_000)
    """A worker reporting this many queued requests in its heartbeat takes no more."""

    retry_after_s: int = Field(default=1, ge=1, le=3600)
    """``Retry-After`` seconds sent with 503 answers."""

    drain_timeout_s: float = Field(default=30.0, ge=0.0, le=3600.0)
    """On SIGTERM: how long in-flight requests may run before the router exits anyway."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Logging level of the router process."""
