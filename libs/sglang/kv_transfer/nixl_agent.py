"""One NIXL agent per worker: the KV pool registered once, its record in Redis, remote peers.

Shared by ``NixlKVSender`` and ``NixlKVReceiver``. The registered memory is the one page-major
pool tensor (``KVPool.buffer``); descriptor lists address *blocks*: block ``p`` is page ``p``, its
tokens' K and V for every layer, ``page_bytes`` bytes at ``base + p * page_bytes``. They are
prepared once per side (the local pool once; each peer's pool the first time we write to it) as
strided lists, so a per-page transfer is only two index arrays (the page ids themselves).

UCX environment: the connector never sets ``UCX_NET_DEVICES`` or ``UCX_TLS`` (a process-wide
choice that also decides whether two hosts can reach each other: ``lo`` would make a two-host
deployment fail); single-host deployments and tests set ``UCX_NET_DEVICES=lo`` before the first
agent is created. The only UCX variables it sets are ``UCX_LOG_FILE`` and ``UCX_PROTO_INFO`` (see
``ucx_info``; off with ``capture_ucx_info=False``), and only when unset. If UCX cannot create the
backend with peer-failure handling (e.g. ``UCX_TLS=shm,self``), it is created again with
``ucx_error_handling_mode=none`` and a warning: a dead peer is then found by heartbeats and
timeouts only.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nixl._api import nixl_agent, nixl_agent_config, nixl_prepped_dlist_handle

from sglang.kv_transfer.base import KVLayout, TransportInfo
from sglang.kv_transfer.metadata import AgentHeartbeat, AgentRecord, PeerLiveness, connect, read_agent
from sglang.kv_transfer.ucx_info import UcxLogReader, enable_capture, ucx_env

logger = logging.getLogger(__name__)

BACKEND = "UCX"
_NET_TLS = ("tcp", "rc", "ud", "dc", "ib", "all", "srd", "ugni")  # UCX_TLS names of network transports


class PeerUnavailable(RuntimeError):
    """The peer's agent record is not in Redis (never started, or its heartbeat lapsed)."""


@dataclass
class Peer:
    record: AgentRecord
    dlist: nixl_prepped_dlist_handle | None = None  # remote blocks, prepared on first write


@dataclass
class AgentOptions:
    """Knobs shared by both sides (keyword arguments of the sender and receiver)."""

    key_prefix: str = "sglang"
    heartbeat_s: float = 1.0  # agent record rewrite period
    peer_ttl_s: float = 3.0  # record TTL: a peer silent this long is gone
    liveness_period_s: float = 0.5  # how often poll() checks the peers it waits on
    ucx_error_handling_mode: str | None = None  # None: UCX default ("peer"), "none" as fallback
    capture_ucx_info: bool = True  # parse UCX's protocol tables (see ucx_info)


def _strided(addrs: list[int], page_bytes: int, num_blocks: int, dev: int) -> np.ndarray:
    return np.array([[a, page_bytes, dev, page_bytes, num_blocks] for a in addrs], dtype=np.uint64)


def _dense(addrs: list[int], page_bytes: int, num_blocks: int, dev: int) -> np.ndarray:
    rows = [(a + p * page_bytes, page_bytes, dev) for a in addrs for p in range(num_blocks)]
    return np.array(rows, dtype=np.uint64)


class NixlKVAgent:
    def __init__(
        self, kv_pool: Any, layout: KVLayout, agent_name: str, redis_url: str, role: str, opts: AgentOptions
    ) -> None:
        layout.check_pool(kv_pool)
        self.name = agent_name
        self.role = role
        self.layout = layout
        self.layout_hash = layout.compat_hash()
        self.opts = opts
        self.prefix = opts.key_prefix
        first: torch.Tensor = kv_pool.buffer
        if not first.is_contiguous():
            raise ValueError("the KV pool tensor must be contiguous")
        self.tensors = [first]  # the one registered region
        self.num_pages = int(kv_pool.num_pages)
        self.blocks = self.num_pages + 1  # page 0 (padding) included so block index == page id
        self.page_bytes = int(kv_pool.page_bytes_all_layers)  # one block: a page of every layer, K and V
        if self.page_bytes * self.blocks != first.numel() * first.element_size():
            raise ValueError("the KV pool tensor is not num_pages + 1 blocks of page_bytes_all_layers")
        self.mem_type = "VRAM" if first.is_cuda else "DRAM"
        self.src_kind = "cuda" if first.is_cuda else "host"  # how UCX's tables name this memory
        self.device_id = (first.device.index or 0) if first.is_cuda else 0
        self.bytes_per_page_all_layers = self.page_bytes

        self.ucx_log = UcxLogReader(enable_capture() if opts.capture_ucx_info else None, agent_name)
        self._check_env()
        self.agent = nixl_agent(agent_name, nixl_agent_config(backends=[]))
        self.backend_params = self._create_backend()
        self.reg = self.agent.register_memory(self.tensors)
        self._local: nixl_prepped_dlist_handle | None = None
        self.peers: dict[str, Peer] = {}
        self.redis = connect(redis_url)
        self.instance = uuid.uuid4().hex
        record = AgentRecord(
            agent=agent_name, instance=self.instance, role=role, layout=layout.to_dict(),
            layout_hash=self.layout_hash, mem_type=self.mem_type, device_id=self.device_id,
            num_pages=self.num_pages, page_bytes=self.page_bytes, buffers=[first.data_ptr()],
            metadata=self.agent.get_agent_metadata(), host=socket.gethostname(), pid=os.getpid(),
        )
        self.heartbeat = AgentHeartbeat(redis_url, self.prefix, record, opts.heartbeat_s, opts.peer_ttl_s)
        self.liveness = PeerLiveness(self.redis, self.prefix, opts.liveness_period_s, grace_s=opts.liveness_period_s)
        self._reported: set[str] = set()
        self._closed = False
        logger.info(
            "kv_transfer %s agent %s: page-major pool, %d pages x %d B (%s), UCX env %s, params %s",
            role, agent_name, self.blocks, self.page_bytes, self.mem_type, ucx_env(),
            self.backend_params,
        )

    # ---- setup ---------------------------------------------------------------------------
    def _check_env(self) -> None:
        tls = os.environ.get("UCX_TLS", "").strip()
        if tls.startswith("^"):  # an exclusion list
            no_cuda = any(t.startswith("cuda") for t in tls[1:].split(","))
        else:
            no_cuda = bool(tls) and tls != "all" and not any(t.startswith("cuda") for t in tls.split(","))
        if self.mem_type == "VRAM" and no_cuda:
            logger.warning(
                "!!! kv_transfer: KV pool is on GPU but UCX_TLS=%s has no CUDA transport: KV pages will be "
                "staged through host memory or TCP (slow). Unset UCX_TLS or add cuda_ipc,cuda_copy.", tls,
            )
        if self.mem_type == "DRAM" and "UCX_NET_DEVICES" not in os.environ:
            logger.info("kv_transfer: UCX_NET_DEVICES is unset (UCX uses every device); single-host setups use lo")

    def _create_backend(self) -> dict[str, str]:
        mode = self.opts.ucx_error_handling_mode
        tls = os.environ.get("UCX_TLS", "").strip()
        if mode is None and tls and not tls.startswith("^") and not any(
            t.strip().startswith(_NET_TLS) for t in tls.split(",")
        ):
            # Shared-memory-only transports have no peer failure handler: UCX refuses "peer" mode.
            logger.info("kv_transfer: UCX_TLS=%s has no network transport: ucx_error_handling_mode=none", tls)
            mode = "none"
        params = {} if mode is None else {"ucx_error_handling_mode": mode}
        try:
            self.agent.create_backend(BACKEND, params)
        except Exception as e:  # nixlBackendError; its class lives in the bindings module
            if mode is not None:
                raise
            logger.warning(
                "kv_transfer: UCX backend failed with peer failure handling (%s; UCX_TLS=%s); retrying with "
                "ucx_error_handling_mode=none: dead peers are then detected by heartbeats and timeouts only",
                e, os.environ.get("UCX_TLS", "<unset>"),
            )
            params = {"ucx_error_handling_mode": "none"}
            self.agent.create_backend(BACKEND, params)
        defaults = dict(self.agent.get_plugin_params(BACKEND))  # what the backend ran with
        return {**defaults, **dict(self.agent.get_backend_params(BACKEND)), **params}

    def _prep(self, agent: str, addrs: list[int], blocks: int, mem_type: str, dev: int) -> nixl_prepped_dlist_handle:
        try:
            return self.agent.prep_xfer_dlist(agent, _strided(addrs, self.page_bytes, blocks, dev), mem_type)
        except Exception as e:  # older NIXL without strided lists: one row per block
            logger.info("kv_transfer: strided descriptor list refused (%s); using a dense one", e)
            return self.agent.prep_xfer_dlist(agent, _dense(addrs, self.page_bytes, blocks, dev), mem_type)

    def local_dlist(self) -> nixl_prepped_dlist_handle:
        if self._local is None:
            addrs = [t.data_ptr() for t in self.tensors]
            self._local = self._prep("NIXL_INIT_AGENT", addrs, self.blocks, self.mem_type, self.device_id)
        return self._local

    # ---- peers ---------------------------------------------------------------------------
    def peer(self, name: str, instance: str = "", for_write: bool = False) -> Peer:
        """The peer's record, loaded into the agent (``add_remote_agent``) on first use or when its
        incarnation changed; ``for_write`` also prepares its descriptor list."""
        peer = self.peers.get(name)
        if peer is not None and instance and peer.record.instance != instance:
            logger.info("kv_transfer: agent %s restarted (new instance); reloading its metadata", name)
            self.forget_peer(name)
            peer = None
        if peer is None:
            record = read_agent(self.redis, self.prefix, name)
            if record is None:
                raise PeerUnavailable(f"agent {name} has no record in Redis (not started or gone)")
            if instance and record.instance != instance:
                raise PeerUnavailable(f"agent {name} restarted since it published this room")
            self.agent.add_remote_agent(record.metadata)
            peer = self.peers[name] = Peer(record)
        if for_write and peer.dlist is None:
            r = peer.record
            if r.page_bytes != self.page_bytes or len(r.buffers) != 1:
                raise PeerUnavailable(
                    f"agent {name} page_bytes {r.page_bytes} != {self.page_bytes} or {len(r.buffers)} buffers != 1"
                )
            peer.dlist = self._prep(name, r.buffers, r.num_pages + 1, r.mem_type, r.device_id)
        return peer

    def forget_peer(self, name: str) -> None:
        peer = self.peers.pop(name, None)
        if peer is None:
            return
        if peer.dlist is not None:
            try:
                peer.dlist.release()
            except Exception as e:
                logger.warning("kv_transfer: releasing %s's descriptor list failed: %s", name, e)
        try:
            self.agent.remove_remote_agent(name)
        except Exception as e:
            logger.debug("kv_transfer: remove_remote_agent(%s): %s", name, e)

    def send_notif(self, name: str, msg: bytes) -> bool:
        """Best effort standalone notification; loads the peer's metadata if needed."""
        try:
            self.peer(name)
            self.agent.send_notif(name, msg)
            return True
        except Exception as e:
            logger.warning("kv_transfer: notification to %s failed: %s", name, e)
            return False

    def notifs(self) -> dict[str, list[bytes]]:
        got: dict[str, list[bytes]] = self.agent.get_new_notifs()
        return got

    # ---- transport visibility -------------------------------------------------------------
    def poll_transport(self, force: bool = False) -> None:
        """Read UCX's selections; log them once, and loudly when a put goes over TCP on GPU."""
        if not self.ucx_log.poll(force):
            return
        sel = self.ucx_log.selected
        summary = "; ".join(f"{k}={','.join(v)}" for k, v in sorted(sel.items()))
        logger.info("kv_transfer %s: UCX transports selected: %s", self.name, summary)
        for op in self.ucx_log.tcp_rma(self.src_kind):
            if op in self._reported:
                continue
            self._reported.add(op)
            if self.mem_type == "VRAM":
                logger.warning(
                    "!!! kv_transfer %s: KV pages in GPU memory go over TCP (%s = %s). Expect 10-100x lower "
                    "bandwidth; check UCX_TLS / UCX_NET_DEVICES and that cuda_ipc or RDMA is available.",
                    self.name, op, ",".join(sel[op]),
                )
            else:
                logger.warning("kv_transfer %s: KV pages go over TCP (%s = %s); shared memory (cma) is "
                               "4-10x faster on one host", self.name, op, ",".join(sel[op]))

    def transport_info(self) -> TransportInfo:
        self.poll_transport(force=True)
        note = "" if self.ucx_log.available else (
            "UCX protocol tables not captured (UCX_LOG_FILE set by the user or UCX loaded before the "
            "connector); run with UCX_PROTO_INFO=y to see them in UCX's log"
        )
        if self.ucx_log.available and not self.ucx_log.selected:
            note = "UCX selects transports on the first transfer to a peer"
        return TransportInfo(
            backend=BACKEND, mem_type=self.mem_type, env=ucx_env(), params=dict(self.backend_params),
            selected={k: list(v) for k, v in self.ucx_log.selected.items()},
            tcp_fallback=bool(self.ucx_log.tcp_rma(self.src_kind)), note=note,
        )

    # ---- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.heartbeat.stop()
        for name in list(self.peers):
            self.forget_peer(name)
        if self._local is not None:
            self._local.release()
            self._local = None
        try:
            self.agent.deregister_memory(self.reg)
        except Exception as e:
            logger.warning("kv_transfer: deregister_memory failed: %s", e)
        self.redis.close()
        del self.agent
