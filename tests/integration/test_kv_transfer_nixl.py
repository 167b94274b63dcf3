"""NIXL KV connector, for real: two processes (this one decodes, tests/helpers/kv_transfer_peer.py
prefills), DRAM to DRAM over UCX on 127.0.0.1 (``UCX_NET_DEVICES=lo``), a real Redis."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

pytest.importorskip("nixl._api")

from sglang.engine.memory import KVPool  # noqa: E402
from sglang.kv_transfer import IncompatibleKVLayout, KVLayout, RoomResult, create_receiver, create_sender  # noqa: E402
from sglang.kv_transfer.base import KVReceiver  # noqa: E402
from sglang.kv_transfer.nixl_sender import _runs  # noqa: E402

from tests.helpers.redis_server import start_redis  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
PEER = REPO / "tests" / "helpers" / "kv_transfer_peer.py"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    os.environ.setdefault("UCX_NET_DEVICES", "lo")  # before any agent loads UCX, here and in the peers
    url, stop = start_redis()
    try:
        yield url
    finally:
        stop()


class Peer:
    """The peer process; its stdout lines (JSON events) are read by a thread into a queue."""

    def __init__(self, cfg: dict[str, Any], tmp: Path) -> None:
        self.stderr_path = tmp / f"peer-{cfg['agent_name']}.err"
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), json.dumps(cfg)], stdout=subprocess.PIPE, stderr=self._err,
            stdin=subprocess.DEVNULL, env=env, cwd=REPO,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):  # not one of the peer's event lines
                self.events.put(json.loads(line))

    def wait(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = self.events.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    break
                continue
            if got["event"] == event:
                return got
            raise AssertionError(f"peer reported {got} while waiting for {event}")
        raise AssertionError(f"no {event!r} from the peer in {timeout}s; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._err.close()


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.stop()


def layout_dict(dtype: str, page_size: int, layers: int = 4, heads: int = 4, dim: int = 32) -> dict[str, Any]:
    return {"model": "tiny-llama", "num_layers": layers, "page_size": page_size, "num_kv_heads": heads,
            "head_dim": dim, "dtype": dtype}


def decode_pool(lay: dict[str, Any], num_pages: int, device: str = "cpu") -> tuple[KVPool, KVLayout]:
    pool = KVPool(num_pages, lay["page_size"], lay["num_layers"], lay["num_kv_heads"], lay["head_dim"],
                  getattr(torch, lay["dtype"]), device)
    return pool, KVLayout(**lay)


def poll_until(rx: KVReceiver, room: int, timeout: float) -> tuple[RoomResult, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for res in rx.poll():
            if res.room == room:
                return res, time.monotonic() - t0
        time.sleep(0.002)
    raise AssertionError(f"room {room} not reported in {timeout}s")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes as integers: equality of these is byte equality."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_pages_equal(pool: KVPool, dst_pages: list[int], expected: torch.Tensor) -> None:
    """``pool``'s pages ``dst_pages`` hold ``expected`` bit for bit (every layer's K and V), and
    every other page is still zero (no stray writes)."""
    buf = pool.buffer.cpu()
    assert torch.equal(bits(buf[dst_pages]), bits(expected)), "transferred pages differ"
    assert buf[dst_pages].abs().sum() > 0
    for layer in range(pool.num_layers):  # also through the attention backends' per-layer views
        for kv in range(2):
            got = pool.get_kv(layer)[kv].cpu()[dst_pages]
            assert torch.equal(bits(got), bits(expected[:, layer, kv])), f"layer {layer} {'kv'[kv]} differs"
    untouched = torch.ones(buf.shape[0], dtype=torch.bool)
    untouched[dst_pages] = False
    assert buf[untouched].abs().sum().item() == 0, "stray writes"


def _descriptors(chunk: list[list[int]]) -> int:
    """Descriptors the sender posts for one chunk: one per run of pages consecutive on both sides,
    or one per page when no run is longer than a page."""
    return min(len(_runs(*chunk)), len(chunk[0]))


def new_room() -> int:
    return uuid.uuid4().int >> 66  # 62-bit (room + 1 stays 63-bit), like SGLang's bootstrap_room


CASES = [
    ("float32", 1, 4, 32, [3, 4, 5, 9, 10, 1, 2, 20, 21, 22], [40, 7, 8, 9, 33, 1, 2, 50, 3, 60]),
    ("bfloat16", 16, 8, 64, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [30, 31, 32, 33, 2, 5, 6, 7, 40, 41, 42, 3]),
]


@pytest.mark.parametrize(("dtype", "page_size", "heads", "dim", "src_pages", "dst_pages"), CASES)
def test_pages_arrive_exactly(
    redis_url: str, peers: list[Peer], tmp_path: Path, dtype: str, page_size: int, heads: int, dim: int,
    src_pages: list[int], dst_pages: list[int],
) -> None:
    transfer_and_check(redis_url, peers, tmp_path, dtype, page_size, heads, dim, src_pages, dst_pages, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "page_size", "heads", "dim", "src_pages", "dst_pages"),
    [*CASES, ("bfloat16", 16, 8, 128, list(range(1, 257)), list(range(300, 556)))],  # + 64 MiB, for a GB/s print
)
def test_pages_arrive_exactly_gpu_to_gpu(
    redis_url: str, peers: list[Peer], tmp_path: Path, dtype: str, page_size: int, heads: int, dim: int,
    src_pages: list[int], dst_pages: list[int],
) -> None:
    """VRAM to VRAM between two processes on GPU 0: UCX must use cuda_ipc (or RDMA), never TCP."""
    done = transfer_and_check(redis_url, peers, tmp_path, dtype, page_size, heads, dim, src_pages, dst_pages, "cuda")
    assert done["tcp_fallback"] is False, done["transport"]
    assert not any("tcp" in t for t in done["transport"]["put intra-node cuda->cuda"]), done["transport"]


def transfer_and_check(
    redis_url: str, peers: list[Peer], tmp_path: Path, dtype: str, page_size: int, heads: int, dim: int,
    src_pages: list[int], dst_pages: list[int], device: str,
) -> dict[str, Any]:
    """Send ``src_pages`` from a peer process in 3 chunks; check every byte; return its "done" event."""
    lay = layout_dict(dtype, page_size, heads=heads, dim=dim)
    pool, layout = decode_pool(lay, num_pages=max(64, max(dst_pages)), device=device)
    rx = create_receiver("nixl", kv_pool=pool, layout=layout, agent_name=f"dec-{uuid.uuid4().hex[:6]}",
                         redis_url=redis_url, timeout_s=30.0)
    try:
        room = new_room()
        thirds = [(0, 3), (3, 7), (7, len(src_pages))]  # 3 chunks of different sizes
        chunks = [[src_pages[a:b], dst_pages[a:b]] for a, b in thirds]
        aux = {"first_token": 1234, "logprob": -0.25, "cached_tokens": 7}
        cfg = {"role": "sender", "agent_name": f"pre-{uuid.uuid4().hex[:6]}", "redis_url": redis_url,
               "layout": lay, "num_pages": max(24, max(src_pages)), "seed": 7, "room": room, "chunks": chunks, "aux": aux,
               "expected": str(tmp_path / "expected.pt"), "deadline_s": 60, "warmup_room": room + 1,
               "device": device}
        peer = Peer(cfg, tmp_path)
        peers.append(peer)
        peer.wait("ready", timeout=60)
        rx.publish(room + 1, dst_pages)  # the warm-up room: the same pages, same bytes, one chunk
        assert poll_until(rx, room + 1, timeout=30)[0] == RoomResult(room + 1, True, {}, None)
        rx.publish(room, dst_pages)
        res, _ = poll_until(rx, room, timeout=30)
        assert res == RoomResult(room, True, aux, None)
        done = peer.wait("done")
        assert done["ok"] is True and done["error"] is None
        nbytes = done["stats"][0]["bytes"]
        assert nbytes == len(src_pages) * 2 * lay["num_layers"] * page_size * heads * dim * pool.buffer.element_size()
        assert done["stats"][0]["descriptors"] == sum(_descriptors(c) for c in chunks)
        print(f"\n{device} {dtype} page_size={page_size}: {nbytes / 1e6:.2f} MB in {done['seconds'] * 1e3:.2f} ms "
              f"= {nbytes / 1e6 / done['seconds']:.0f} MB/s (3 chunks, {done['stats'][0]['descriptors']} descriptors, "
              f"warm connection, polling included); transports {done['transport']}")

        expected = torch.load(tmp_path / "expected.pt", map_location="cpu")["pages"]
        assert_pages_equal(pool, dst_pages, expected)
        assert redis.Redis.from_url(redis_url).get(f"sglang:nixl:room:{room}") is None
        mem = "host->host" if device == "cpu" else "cuda->cuda"
        assert done["transport"].get(f"put intra-node {mem}"), done["transport"]
        assert rx.transport_info().mem_type == ("DRAM" if device == "cpu" else "VRAM")
        return done
    finally:
        rx.close()


@pytest.mark.parametrize(("src", "dst", "descriptors"), [
    (list(range(5, 21)), list(range(30, 46)), 1),  # 16 pages consecutive on both sides: ONE descriptor
    ([1, 2, 3, 10, 11], [20, 21, 22, 5, 6], 2),  # two runs
    ([9, 3, 17, 5], [40, 31, 2, 12], 4),  # nothing consecutive: one prepared block (page, all layers) each
])
def test_consecutive_pages_are_one_descriptor(
    redis_url: str, src: list[int], dst: list[int], descriptors: int
) -> None:
    """Both sides in this process: counts the descriptors the sender hands NIXL (rows of the
    descriptor lists it builds, or indices into the prepared per-page lists), and checks every
    layer's K and V on the decode side equal the prefill side's bit for bit."""
    lay = layout_dict("bfloat16", 16, layers=6, heads=2, dim=64)
    pre_pool, layout = decode_pool(lay, num_pages=24)
    dec_pool, _ = decode_pool(lay, num_pages=48)
    gen = torch.Generator().manual_seed(11)
    pre_pool.buffer.copy_(torch.randn(pre_pool.buffer.shape, generator=gen).to(torch.bfloat16))
    rx = create_receiver("nixl", kv_pool=dec_pool, layout=layout, agent_name=f"dec-{uuid.uuid4().hex[:6]}",
                         redis_url=redis_url, timeout_s=30.0)
    tx = create_sender("nixl", kv_pool=pre_pool, layout=layout, agent_name=f"pre-{uuid.uuid4().hex[:6]}",
                       redis_url=redis_url, timeout_s=30.0)
    built: list[tuple[str, int]] = []
    agent = tx.kv.agent  # type: ignore[attr-defined]
    get_descs, prepped = agent.get_xfer_descs, agent.make_prepped_xfer

    def spy_descs(descs: Any, mem_type: str) -> Any:
        built.append(("list", len(descs)))
        return get_descs(descs, mem_type)

    def spy_prepped(op: str, local: Any, local_idx: Any, remote: Any, remote_idx: Any, notif: bytes) -> Any:
        built.append(("prepped", len(local_idx)))
        assert list(local_idx) == src and list(remote_idx) == dst  # block index == page id
        return prepped(op, local, local_idx, remote, remote_idx, notif)

    agent.get_xfer_descs, agent.make_prepped_xfer = spy_descs, spy_prepped
    try:
        room = new_room()
        rx.publish(room, dst)
        assert tx.dest(room) is not None
        tx.send(room, src, dst, 0, last=True, aux={"first_token": 5})
        got: list[RoomResult] = []
        sent: list[tuple[int, bool, str | None]] = []
        deadline = time.monotonic() + 30
        while not (got and sent) and time.monotonic() < deadline:  # one thread drives both agents
            got += rx.poll()
            sent += tx.poll()
            time.sleep(0.001)
        assert got == [RoomResult(room, True, {"first_token": 5}, None)]
        assert sent == [(room, True, None)]
        kind = "prepped" if descriptors == len(src) else "list"
        assert built == ([("list", descriptors)] * 2 if kind == "list" else [("prepped", descriptors)])
        stats = tx.pop_stats()
        block = pre_pool.page_bytes_all_layers
        assert block == 6 * 2 * 16 * 2 * 64 * 2
        assert [(s.ok, s.descriptors, s.bytes) for s in stats] == [(True, descriptors, len(src) * block)]
        assert_pages_equal(dec_pool, dst, pre_pool.buffer[src])
    finally:
        tx.close()
        rx.close()


def test_transfer_speed_counts_only_time_on_the_wire(redis_url: str) -> None:
    """Two chunks 0.4 s apart (as when the second chunk's forward runs in between): the room's
    latency holds the gap, its wire time (the speed metric's denominator) does not, and the
    sender reports ``writing`` exactly while a write is in flight."""
    lay = layout_dict("float32", 16, layers=4, heads=2, dim=32)
    pre_pool, layout = decode_pool(lay, num_pages=16)
    dec_pool, _ = decode_pool(lay, num_pages=16)
    pre_pool.buffer.copy_(torch.randn(pre_pool.buffer.shape, generator=torch.Generator().manual_seed(3)))
    rx = create_receiver("nixl", kv_pool=dec_pool, layout=layout, agent_name=f"dec-{uuid.uuid4().hex[:6]}",
                         redis_url=redis_url, timeout_s=30.0)
    tx = create_sender("nixl", kv_pool=pre_pool, layout=layout, agent_name=f"pre-{uuid.uuid4().hex[:6]}",
                       redis_url=redis_url, timeout_s=30.0)
    try:
        room = new_room()
        rx.publish(room, [8, 9, 10, 11])
        assert tx.dest(room) is not None and not tx.writing
        tx.send(room, [1, 2], [8, 9], 0, last=False)
        assert tx.writing
        deadline = time.monotonic() + 30
        while tx.writing and time.monotonic() < deadline:
            assert tx.poll() == []
            rx.poll()
            time.sleep(0.001)
        assert not tx.writing
        time.sleep(0.4)
        tx.send(room, [3, 4], [10, 11], 1, last=True, aux={"first_token": 7})
        sent: list[tuple[int, bool, str | None]] = []
        while not sent and time.monotonic() < deadline:
            sent += tx.poll()
            rx.poll()
            time.sleep(0.001)
        assert sent == [(room, True, None)]
        (st,) = tx.pop_stats()
        assert st.seconds >= 0.4
        assert 0 < st.wire_seconds < st.seconds - 0.3
        assert st.gb_per_s == pytest.approx(st.bytes / st.wire_seconds / 1e9)
        assert_pages_equal(dec_pool, [8, 9, 10, 11], pre_pool.buffer[[1, 2, 3, 4]])
    finally:
        tx.close()
        rx.close()


def test_room_nobody_sends_times_out(redis_url: str) -> None:
    pool, layout = decode_pool(layout_dict("float32", 1), num_pages=8)
    rx = create_receiver("nixl", kv_pool=pool, layout=layout, agent_name=f"dec-{uuid.uuid4().hex[:6]}",
                         redis_url=redis_url, timeout_s=1.0)
    try:
        room = new_room()
        rx.publish(room, [1, 2, 3])
        res, elapsed = poll_until(rx, room, timeout=10)
        assert res == RoomResult(room, False, None, "timed out after 1s waiting for KV")
        assert 1.0 <= elapsed < 5.0
        assert redis.Redis.from_url(redis_url).get(f"sglang:nixl:room:{room}") is None
        assert rx.poll() == []  # reported once
    finally:
        rx.close()


@pytest.mark.parametrize(("peer_ttl_s", "rx_timeout_s", "error"), [
    (60.0, 2.0, "timed out after 2s waiting for KV"),  # heartbeat key outlives the wait: the timeout fires
    (1.5, 60.0, "is gone (its heartbeat in Redis lapsed)"),  # short heartbeat TTL: the death is noticed first
])
def test_sender_killed_before_last_chunk(
    redis_url: str, peers: list[Peer], tmp_path: Path, peer_ttl_s: float, rx_timeout_s: float, error: str
) -> None:
    lay = layout_dict("float32", 16)
    pool, layout = decode_pool(lay, num_pages=16)
    rx = create_receiver("nixl", kv_pool=pool, layout=layout, agent_name=f"dec-{uuid.uuid4().hex[:6]}",
                         redis_url=redis_url, timeout_s=rx_timeout_s)
    try:
        room = new_room()
        cfg = {"role": "sender", "agent_name": f"pre-{uuid.uuid4().hex[:6]}", "redis_url": redis_url,
               "layout": lay, "num_pages": 8, "room": room, "chunks": [[[1], [4]], [[2], [5]], [[3], [6]]],
               "aux": {"first_token": 1}, "expected": str(tmp_path / "expected.pt"), "deadline_s": 60,
               "die_before_last": True, "settle_s": 0.5, "options": {"heartbeat_s": 0.5, "peer_ttl_s": peer_ttl_s}}
        peer = Peer(cfg, tmp_path)
        peers.append(peer)
        peer.wait("ready")
        rx.publish(room, [4, 5, 6])
        peer.wait("before_last")
        t_kill = time.monotonic()
        peer.kill()
        res, _ = poll_until(rx, room, timeout=30)
        waited = time.monotonic() - t_kill
        assert not res.ok and res.aux is None and res.error is not None and error in res.error, res
        assert waited < 10.0
        assert redis.Redis.from_url(redis_url).get(f"sglang:nixl:room:{room}") is None
    finally:
        rx.close()


def test_layout_mismatch_is_refused_naming_the_field(redis_url: str, peers: list[Peer], tmp_path: Path) -> None:
    pool, layout = decode_pool(layout_dict("float32", 1), num_pages=16)
    rx = create_receiver("nixl", kv_pool=pool, layout=layout, agent_name=f"dec-{uuid.uuid4().hex[:6]}",
                         redis_url=redis_url, timeout_s=30.0)
    try:
        room = new_room()
        cfg = {"role": "sender", "agent_name": f"pre-{uuid.uuid4().hex[:6]}", "redis_url": redis_url,
               "layout": layout_dict("float32", 16), "num_pages": 4, "room": room, "chunks": [[[1], [2]]],
               "aux": {}, "expected": str(tmp_path / "expected.pt"), "deadline_s": 30}
        peer = Peer(cfg, tmp_path)
        peers.append(peer)
        peer.wait("ready")
        rx.publish(room, [2])
        got = peer.wait("incompatible")
        assert got["fields"] == ["page_size"]
        assert "page_size: prefill 16 != decode 1" in got["message"], got["message"]
        res, elapsed = poll_until(rx, room, timeout=10)  # the decode side is told, no 30 s wait
        assert not res.ok and res.error is not None and "page_size: prefill 16 != decode 1" in res.error
        assert elapsed < 10.0
    finally:
        rx.close()


def test_layout_mismatch_in_process(redis_url: str) -> None:
    dec_pool, dec_layout = decode_pool(layout_dict("float32", 1, heads=4), num_pages=8)
    pre_pool, pre_layout = decode_pool(layout_dict("bfloat16", 1, heads=2), num_pages=8)
    rx = create_receiver("nixl", kv_pool=dec_pool, layout=dec_layout, agent_name=f"dec-{uuid.uuid4().hex[:6]}",
                         redis_url=redis_url)
    tx = create_sender("nixl", kv_pool=pre_pool, layout=pre_layout, agent_name=f"pre-{uuid.uuid4().hex[:6]}",
                       redis_url=redis_url)
    try:
        room = new_room()
        assert tx.dest(room) is None  # not published yet
        rx.publish(room, [1])
        with pytest.raises(IncompatibleKVLayout) as info:
            tx.dest(room)
        assert info.value.fields == ["num_kv_heads", "dtype"]
        assert "num_kv_heads: prefill 2 != decode 4" in str(info.value)
        assert "dtype: prefill 'bfloat16' != decode 'float32'" in str(info.value)
    finally:
        tx.close()
        rx.close()


def test_decode_killed_mid_transfer_fails_the_room_on_the_prefill_side(
    redis_url: str, peers: list[Peer], tmp_path: Path
) -> None:
    lay = layout_dict("float32", 4)
    pool, layout = decode_pool(lay, num_pages=8)
    pool.buffer.normal_()
    tx = create_sender("nixl", kv_pool=pool, layout=layout, agent_name=f"pre-{uuid.uuid4().hex[:6]}",
                       redis_url=redis_url, timeout_s=30.0)
    try:
        room = new_room()
        cfg = {"role": "receiver", "agent_name": f"dec-{uuid.uuid4().hex[:6]}", "redis_url": redis_url,
               "layout": lay, "num_pages": 8, "room": room, "dst_pages": [3, 4, 5], "deadline_s": 60,
               "options": {"heartbeat_s": 0.5, "peer_ttl_s": 1.5}}
        peer = Peer(cfg, tmp_path)
        peers.append(peer)
        peer.wait("published")
        assert tx.dest(room) is not None
        tx.send(room, [1], [3], 0, last=False)
        peer.kill()
        t_kill = time.monotonic()
        tx.send(room, [2, 3], [4, 5], 1, last=True, aux={"first_token": 1})
        result = None
        while time.monotonic() - t_kill < 20 and result is None:
            for r, ok, err in tx.poll():
                if r == room:
                    result = (ok, err)
            time.sleep(0.005)
        assert result is not None, "room never reported"
        ok, err = result
        assert ok is False and err and cfg["agent_name"] in err, result
        assert tx.poll() == []  # reported once
    finally:
        tx.close()


SHM_ONLY = """
import time, torch
from sglang.engine.memory import KVPool
from sglang.kv_transfer import KVLayout, create_receiver, create_sender
ps, pd = (KVPool(8, 4, 2, 2, 8, torch.float32, "cpu") for _ in range(2))
ps.buffer[:, 1].normal_()
lay = KVLayout.from_pool(ps, "m")
rx = create_receiver(kv_pool=pd, layout=lay, agent_name="shm-d", redis_url=URL, timeout_s=10)
tx = create_sender(kv_pool=ps, layout=lay, agent_name="shm-p", redis_url=URL, timeout_s=10)
rx.publish(1, [3])
assert tx.dest(1) is not None
tx.send(1, [2], [3], 0, True, {"first_token": 9})
t0, got = time.monotonic(), []
while time.monotonic() - t0 < 10 and not got:
    got = rx.poll()
    tx.poll()
    time.sleep(0.001)
assert [(r.ok, r.aux) for r in got] == [(True, {"first_token": 9})], got
assert torch.equal(ps.buffer[2], pd.buffer[3]) and pd.buffer[3].abs().sum() > 0
print("mode", tx.transport_info().params["ucx_error_handling_mode"], rx.transport_info().params["ucx_error_handling_mode"])
tx.close(); rx.close()
"""


def test_shared_memory_only_ucx_runs_without_peer_error_handling(redis_url: str) -> None:
    """``UCX_TLS=shm,self`` (fastest on one host) needs ``ucx_error_handling_mode=none``: the
    connector picks it by itself (a fresh process: UCX reads its environment once)."""
    env = {**os.environ, "UCX_TLS": "shm,self"}
    env.pop("UCX_LOG_FILE", None)
    code = f"URL = {redis_url!r}\n" + SHM_ONLY
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "mode none none"
    assert "encountered error" not in out.stderr, out.stderr[-3000:]  # NIXL's log of a failed first attempt
