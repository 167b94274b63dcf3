"""The KV handshake in Redis (wire format version ``HANDSHAKE_VERSION``): agent records, room
destinations, heartbeats and peer liveness.

Keys (``prefix`` defaults to ``"sglang"``):

- ``{prefix}:nixl:agent:{agent_name}``: JSON ``AgentRecord`` (NIXL agent metadata base64-encoded,
  layout and its hash, buffer addresses). Rewritten every ``heartbeat_s`` with TTL ``ttl_s`` by a
  daemon thread of its owner, deleted on close: a key that is gone means the agent is gone.
- ``{prefix}:nixl:room:{room}``: JSON ``TransferDest`` published by the decode side, TTL
  ``room_ttl_s``; deleted by the decode side when the room finishes, fails or is cancelled.

NIXL's own metadata listener is never used (it binds 0.0.0.0 and needs both sides to enable it).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from sglang.kv_transfer.base import HANDSHAKE_VERSION, KVLayout

logger = logging.getLogger(__name__)

REDIS_SOCKET_TIMEOUT_S = 2.0  # bounds every Redis call made from the scheduler thread


def agent_key(prefix: str, agent_name: str) -> str:
    return f"{prefix}:nixl:agent:{agent_name}"


def room_key(prefix: str, room: int) -> str:
    return f"{prefix}:nixl:room:{room}"


def connect(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(
        redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S
    )


@dataclass
class AgentRecord:
    """One NIXL agent as its peers see it. ``buffers`` holds one address, the base of the
    page-major KV pool tensor (``KVPool.buffer``); page ``p`` (K and V of every layer, the unit of
    transfer) is ``page_bytes`` bytes at ``buffers[0] + p * page_bytes``."""

    agent: str
    instance: str  # random per agent incarnation
    role: str  # "prefill" | "decode"
    layout: dict[str, Any]
    layout_hash: str
    mem_type: str  # "DRAM" | "VRAM"
    device_id: int
    num_pages: int  # the pool has num_pages + 1 pages (page 0 is padding)
    page_bytes: int  # one page of all layers, K and V (KVPool.page_bytes_all_layers)
    buffers: list[int]
    metadata: bytes = b""  # nixl_agent.get_agent_metadata()
    version: int = HANDSHAKE_VERSION
    host: str = ""
    pid: int = 0
    created_at: float = field(default_factory=time.time)

    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout.from_dict(self.layout)

    def to_json(self) -> str:
        d = asdict(self)
        d["metadata"] = base64.b64encode(self.metadata).decode()
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> AgentRecord:
        d = json.loads(raw)
        d["metadata"] = base64.b64decode(d.get("metadata", ""))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def read_agent(client: redis.Redis, prefix: str, agent_name: str) -> AgentRecord | None:
    raw = client.get(agent_key(prefix, agent_name))
    return None if raw is None else AgentRecord.from_json(raw)  # type: ignore[arg-type]


class AgentHeartbeat:
    """Keeps ``{prefix}:nixl:agent:{name}`` alive: written once at start (synchronously, so peers
    find it as soon as the constructor returns), then every ``heartbeat_s`` by a daemon thread
    with its own Redis connection; deleted by ``stop``."""

    def __init__(
        self, redis_url: str, prefix: str, record: AgentRecord, heartbeat_s: float, ttl_s: float
    ) -> None:
        if not 0 < heartbeat_s < ttl_s:
            raise ValueError(f"need 0 < heartbeat_s ({heartbeat_s}) < ttl_s ({ttl_s})")
        self.key = agent_key(prefix, record.agent)
        self.value = record.to_json()
        self.heartbeat_s = heartbeat_s
        self.ttl_ms = int(ttl_s * 1000)
        self.client = connect(redis_url)
        self.client.set(self.key, self.value, px=self.ttl_ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-heartbeat-{record.agent}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.client.set(self.key, self.value, px=self.ttl_ms)
                if failing:
                    logger.info("kv_transfer heartbeat %s: Redis reachable again", self.key)
                failing = False
            except redis.RedisError as e:
                if not failing:
                    logger.warning("kv_transfer heartbeat %s failed (peers will see this agent gone): %s", self.key, e)
                failing = True

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.client.delete(self.key)
        except redis.RedisError as e:
            logger.warning("kv_transfer: could not delete %s: %s", self.key, e)
        self.client.close()


class PeerLiveness:
    """Answers "which of these agents are gone?" from their heartbeat keys, at most once per
    ``period_s`` (one pipelined ``EXISTS`` round trip). An agent is gone when its key is missing on
    two checks at least ``grace_s`` apart, so a Redis restart is not mistaken for a death."""

    def __init__(self, client: redis.Redis, prefix: str, period_s: float, grace_s: float) -> None:
        self.client = client
        self.prefix = prefix
        self.period_s = period_s
        self.grace_s = grace_s
        self._next = 0.0
        self._missing_since: dict[str, float] = {}
        self._warned = False

    def gone(self, agents: set[str]) -> set[str]:
        now = time.monotonic()
        if not agents or now < self._next:
            return set()
        self._next = now + self.period_s
        names = sorted(agents)
        try:
            pipe = self.client.pipeline(transaction=False)
            for n in names:
                pipe.exists(agent_key(self.prefix, n))
            found = pipe.execute()
            self._warned = False
        except redis.RedisError as e:
            if not self._warned:
                logger.warning("kv_transfer: peer liveness check failed (Redis): %s", e)
                self._warned = True
            return set()
        out: set[str] = set()
        for n, exists in zip(names, found, strict=True):
            if exists:
                self._missing_since.pop(n, None)
                continue
            first = self._missing_since.setdefault(n, now)
            if now - first >= self.grace_s:
                out.add(n)
        for n in list(self._missing_since):
            if n not in agents:
                del self._missing_since[n]
        return out
