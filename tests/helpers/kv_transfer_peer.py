"""A KV transfer peer in its own process, for tests/integration/test_kv_transfer_nixl.py.

``python tests/helpers/kv_transfer_peer.py CONFIG_JSON`` runs one side of a room and reports on
stdout, one JSON object per line (``{"event": ...}``). Roles:

- ``sender`` (prefill): fills its KV pool with seeded random data, saves the source pages (whole
  page-major blocks ``pool.buffer[src_pages]``, every layer's K and V; ``expected`` path, ``torch.save``), waits for the room's destination, then sends ``chunks``
  (a list of ``[src_pages, dst_pages]``), the last one with ``aux``; with ``warmup_room``, the
  same pages go to that room first, in one chunk. ``die_before_last``: report
  ``before_last`` and sleep (the test kills it). An ``IncompatibleKVLayout`` is reported as
  ``incompatible`` with its message and fields.
- ``receiver`` (decode): publishes ``dst_pages`` for the room, reports ``published`` and sleeps.

Every wait is bounded by ``deadline_s``; the process never outlives its parent by more than that.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "libs"))

import torch  # noqa: E402
from sglang.engine.memory import KVPool  # noqa: E402
from sglang.kv_transfer import IncompatibleKVLayout, KVLayout, create_receiver, create_sender  # noqa: E402


def emit(event: str, **kw: Any) -> None:
    print(json.dumps({"event": event, **kw}), flush=True)


def make_pool(cfg: dict[str, Any]) -> tuple[KVPool, KVLayout]:
    lay = cfg["layout"]
    pool = KVPool(
        cfg["num_pages"], lay["page_size"], lay["num_layers"], lay["num_kv_heads"], lay["head_dim"],
        getattr(torch, lay["dtype"]), cfg.get("device", "cpu"),
    )
    return pool, KVLayout(**lay)


def run_sender(cfg: dict[str, Any]) -> None:
    pool, layout = make_pool(cfg)
    gen = torch.Generator().manual_seed(cfg.get("seed", 0))
    buf = pool.buffer  # on GPU: queued on the stream, send() must wait for it
    buf.copy_(torch.randn(buf.shape, generator=gen).to(buf.dtype), non_blocking=True)
    src_all = [p for src, _ in cfg["chunks"] for p in src]
    torch.save({"pages": buf[src_all].cpu()}, cfg["expected"])
    sender = create_sender(
        "nixl", kv_pool=pool, layout=layout, agent_name=cfg["agent_name"], redis_url=cfg["redis_url"],
        timeout_s=cfg.get("timeout_s", 30.0), **cfg.get("options", {}),
    )
    emit("ready")
    room, deadline = cfg["room"], time.monotonic() + cfg["deadline_s"]
    warm = cfg.get("warmup_room")
    if warm is not None:  # connection setup and first-use costs, so that the timing below is warm
        while sender.dest(warm) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        src = [p for s, _ in cfg["chunks"] for p in s]
        sender.send(warm, src, [p for _, d in cfg["chunks"] for p in d], 0, True, {})
        while time.monotonic() < deadline and not any(r == warm for r, _, _ in sender.poll()):
            time.sleep(0.001)
        sender.pop_stats()
    try:
        while sender.dest(room) is None:
            if time.monotonic() > deadline:
                emit("no_dest")
                return
            time.sleep(0.005)
    except IncompatibleKVLayout as e:
        emit("incompatible", message=str(e), fields=e.fields)
        time.sleep(0.5)  # let the abort notification go out before the agent closes
        sender.close()
        return
    t0 = time.perf_counter()
    n = len(cfg["chunks"])
    for i, (src, dst) in enumerate(cfg["chunks"]):
        last = i == n - 1
        if last and cfg.get("die_before_last"):
            t_end = time.monotonic() + cfg.get("settle_s", 0.0)
            while time.monotonic() < t_end:  # let the earlier chunks land before dying
                sender.poll()
                time.sleep(0.005)
            emit("before_last")
            time.sleep(cfg["deadline_s"])
            return
        sender.send(room, src, dst, i, last, cfg["aux"] if last else None)
    while time.monotonic() < deadline:
        for r, ok, err in sender.poll():
            if r == room:
                secs = time.perf_counter() - t0
                stats = [s.__dict__ for s in sender.pop_stats()]
                info = sender.transport_info()
                emit("done", ok=ok, error=err, seconds=secs, stats=stats, transport=info.selected,
                     tcp_fallback=info.tcp_fallback)
                sender.close()
                return
        time.sleep(0.001)
    emit("send_timeout")


def run_receiver(cfg: dict[str, Any]) -> None:
    pool, layout = make_pool(cfg)
    receiver = create_receiver(
        "nixl", kv_pool=pool, layout=layout, agent_name=cfg["agent_name"], redis_url=cfg["redis_url"],
        timeout_s=cfg.get("timeout_s", 30.0), **cfg.get("options", {}),
    )
    receiver.publish(cfg["room"], cfg["dst_pages"])
    emit("published")
    deadline = time.monotonic() + cfg["deadline_s"]
    while time.monotonic() < deadline:
        receiver.poll()
        time.sleep(0.01)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    {"sender": run_sender, "receiver": run_receiver}[cfg["role"]](cfg)


if __name__ == "__main__":
    main()
