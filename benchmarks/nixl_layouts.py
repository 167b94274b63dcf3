"""Raw NIXL WRITE GPU 0 -> GPU 1 for the descriptor layouts a KV transfer can take, in one run.

    python benchmarks/nixl_layouts.py --mb 512 --pieces 64

Layouts (same total bytes):
  one      one descriptor over one registered buffer (the link's best case)
  split    ``pieces`` descriptors inside one registered buffer
  regions  ``pieces`` descriptors, each in its own registered buffer of ``--region-mb`` (what a
           per-layer K/V pool gives: 2 x layers buffers)
For each: median of the post -> DONE time (``transfer`` to ``check_xfer_state == DONE``), and
separately the ``initialize_xfer`` time, over ``--iters`` repetitions (first dropped).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from typing import Any


def _buffers(torch: Any, layout: str, mb: int, pieces: int, region_mb: int, dev: str) -> list[Any]:
    elems = mb * 2**20 // 2
    if layout in ("one", "split"):
        return [torch.ones(elems, dtype=torch.bfloat16, device=dev)]
    return [torch.ones(region_mb * 2**20 // 2, dtype=torch.bfloat16, device=dev) for _ in range(pieces)]


def _descs(bufs: list[Any], layout: str, mb: int, pieces: int, dev_id: int) -> list[tuple[int, int, int]]:
    total = mb * 2**20
    if layout == "one":
        return [(bufs[0].data_ptr(), total, dev_id)]
    piece = total // pieces
    if layout == "split":
        return [(bufs[0].data_ptr() + i * piece, piece, dev_id) for i in range(pieces)]
    # In each region, an offset that is not the start (a KV run sits somewhere inside the pool).
    return [(b.data_ptr() + piece, piece, dev_id) for b in bufs]


def worker(role: str, gpu: int, args: dict[str, Any], q_meta: Any, conn: Any) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    import numpy as np
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mem = "VRAM" if dev == "cuda" else "DRAM"
    agent = nixl_agent(f"layout-{role}", nixl_agent_config(
        enable_prog_thread=not args["no_prog_thread"], backends=[], num_threads=args["num_threads"]
    ))
    params = {"num_workers": str(args["num_workers"])} if args["num_workers"] else {}
    agent.create_backend("UCX", params)
    results: dict[str, Any] = {}
    for layout in args["layouts"]:
        bufs = _buffers(torch, layout, args["mb"], args["pieces"], args["region_mb"], dev)
        agent.register_memory(bufs)
        descs = np.array(_descs(bufs, layout, args["mb"], args["pieces"], 0), dtype=np.uint64)
        if role == "recv":
            q_meta.put((agent.get_agent_metadata(), descs.tobytes()))
            while not conn.poll(0.0005):  # keep this side progressing (needed without a progress thread)
                agent.get_new_notifs()
            conn.recv()  # the sender is done with this layout
            agent.deregister_memory(agent.get_reg_descs(bufs)) if hasattr(agent, "get_reg_descs") else None
            del bufs
            torch.cuda.empty_cache() if dev == "cuda" else None
            conn.send("ok")
            continue
        meta, rdescs = q_meta.get()
        peer = agent.add_remote_agent(meta)
        remote = np.frombuffer(rdescs, dtype=np.uint64).reshape(-1, 3).copy()
        inits, posts = [], []
        for _ in range(args["iters"]):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            k = max(1, min(args["handles"], len(descs)))
            parts = [(np.ascontiguousarray(descs[i::k]), np.ascontiguousarray(remote[i::k])) for i in range(k)]
            hs = [
                agent.initialize_xfer("WRITE", agent.get_xfer_descs(lo, mem), agent.get_xfer_descs(re, mem), peer, b"n")
                for lo, re in parts
            ]
            t1 = time.perf_counter()
            for h in hs:
                agent.transfer(h)
            pending = list(hs)
            while pending:
                pending = [h for h in pending if agent.check_xfer_state(h) not in ("DONE", "ERR")]
                if pending and args["poll_sleep_us"]:
                    time.sleep(args["poll_sleep_us"] / 1e6)
            t2 = time.perf_counter()
            for h in hs:
                agent.release_xfer_handle(h)
            inits.append(t1 - t0)
            posts.append(t2 - t1)
        post = statistics.median(posts[1:])
        results[layout] = {
            "descs": len(descs), "init_ms": statistics.median(inits[1:]) * 1e3, "post_ms": post * 1e3,
            "gbs": args["mb"] * 2**20 / post / 1e9,
        }
        agent.remove_remote_agent(peer)
        conn.send("next")
        conn.recv()
        del bufs
    if role == "send":
        conn.send(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--pieces", type=int, default=64)
    ap.add_argument("--region-mb", type=int, default=64)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--layouts", nargs="+", default=["one", "split", "regions"])
    ap.add_argument("--handles", type=int, default=1, help="split the descriptors over this many xfers")
    ap.add_argument("--num-threads", type=int, default=0, help="nixl_agent_config(num_threads=)")
    ap.add_argument("--num-workers", type=int, default=0, help="UCX backend num_workers (0: default)")
    ap.add_argument("--no-prog-thread", action="store_true", help="nixl_agent_config(enable_prog_thread=False)")
    ap.add_argument("--poll-sleep-us", type=float, default=0.0, help="sleep between completion checks")
    args = ap.parse_args()
    os.environ.setdefault("UCX_NET_DEVICES", "all")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    a, b = ctx.Pipe()
    c, d = ctx.Pipe()
    cfg = vars(args)
    pr = ctx.Process(target=worker, args=("recv", 1, cfg, q, b))
    ps = ctx.Process(target=worker, args=("send", 0, cfg, q, d))
    pr.start()
    ps.start()
    for _ in args.layouts:
        assert c.recv() == "next"
        a.send("done")
        assert a.recv() == "ok"
        c.send("go")
    res = c.recv()
    ps.join()
    pr.join()
    print(f"NIXL WRITE GPU0->GPU1, {args.mb} MiB in total, {args.pieces} pieces, regions of {args.region_mb} MiB, "
          f"handles {args.handles}, num_threads {args.num_threads}, num_workers {args.num_workers or 'default'}, "
          f"poll sleep {args.poll_sleep_us} us, progress thread {not args.no_prog_thread}")
    print("| layout | descriptors | initialize_xfer ms | post->DONE ms | GB/s | vs one |")
    print("|---|---|---|---|---|---|")
    base = res.get("one", {}).get("gbs")
    for k, r in res.items():
        ratio = f"{r['gbs'] / base:.0%}" if base else "-"
        print(f"| {k} | {r['descs']} | {r['init_ms']:.3f} | {r['post_ms']:.3f} | {r['gbs']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
