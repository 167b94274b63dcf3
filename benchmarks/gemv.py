"""Decode linears on CUDA: our skinny matmul (``layers/fused/gemv.py``) against cuBLAS
(``F.linear``), as weight-read GB/s next to the device-to-device copy bandwidth of the same run.

    python benchmarks/gemv.py                         # 8B + Qwen3-0.6B decode shapes, M = 1..16
    python benchmarks/gemv.py --sweep --out gemv.md   # every configuration in the grid at M = 1

Each timing replays a CUDA graph of ``--calls`` products that rotate through enough copies of the
weight (>= 256 MiB in all) that no call finds its weight in L2, so it is the HBM rate a decode step
sees, without launch gaps. GB/s = weight bytes per call / time per call (x and y are negligible).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "libs"))

from common import append_section, markdown_table  # noqa: E402
from hardware import measure_gpu_bandwidth_gbs  # noqa: E402
from sglang.engine.layers.fused.gemv import GemvConfig, default_config, skinny_linear, supported  # noqa: E402

SHAPES = {  # name: (N, K) of W [N, K]
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
    "8b lm_head": (128256, 4096),
    "0.6b qkv": (4096, 1024), "0.6b o": (1024, 2048), "0.6b gate_up": (6144, 1024), "0.6b down": (1024, 3072),
    "0.6b lm_head": (151936, 1024),
}


def grid() -> list[GemvConfig]:
    out = [GemvConfig(bn, bk, 4, s, "dot") for bn in (16, 32) for bk in (128, 256, 512) for s in (3, 4, 6)]
    out += [GemvConfig(bn, 512, 8, s, "dot") for bn in (16, 32, 64) for s in (3, 4)]
    out += [GemvConfig(bn, bk, 4, s, "fma") for bn in (4, 8, 16) for bk in (512, 1024) for s in (3, 4)]
    out += [GemvConfig(bn, bk, w, s, "fma") for bn in (1, 2, 4, 8) for bk in (1024, 2048) for w in (4, 8)
            for s in (2, 3) if (bn, bk, w, s) not in ((4, 1024, 4, 3), (8, 1024, 4, 3))]
    return out


def time_per_call(fn: Any, ws: list[torch.Tensor], x: torch.Tensor, calls: int) -> float:
    """Seconds per call of ``fn(x, w)`` in a CUDA graph of ``calls`` calls over ``ws`` in turn."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for w in ws[:2]:
            fn(x, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(x, ws[i % len(ws)])
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3 / calls)
    del g
    return best


def weights(n: int, k: int) -> list[torch.Tensor]:
    copies = max(2, -(-(256 * 2**20) // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]


def check(cfg: GemvConfig, x: torch.Tensor, w: torch.Tensor) -> float:
    ref = F.linear(x.float(), w.float())
    got = skinny_linear(x, w, cfg=cfg).float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="time every configuration of the grid (at --sweep-rows)")
    ap.add_argument("--sweep-rows", type=int, nargs="+", default=[1], help="rows M to sweep at (fma needs M = 1)")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--gated", action="store_true",
                    help="gate_up shapes as the MLP runs them: silu(gate) * up fused into the product (gated=True)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = measure_gpu_bandwidth_gbs()
    lines = [f"GPU: {torch.cuda.get_device_name()}; device-to-device copy {bw:.0f} GB/s (read + write)", ""]
    rows = []
    sweep_rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        gated = args.gated and name.endswith("gate_up")
        ws = weights(n, k)
        nbytes = n * k * 2
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_cublas = time_per_call(lambda x, w: F.linear(x, w), ws, x, args.calls)
            cfg = default_config(m, n, k, gated)
            if not supported(x, ws[0], cfg):
                rows.append([name, m, nbytes / t_cublas / 1e9, "-", "-", "-", "-"])
                continue
            err = check(cfg, x, ws[0])
            t_ours = time_per_call(lambda x, w, c=cfg, g=gated: skinny_linear(x, w, cfg=c, gated=g), ws, x, args.calls)
            rows.append([name, m, nbytes / t_cublas / 1e9, nbytes / t_ours / 1e9, t_cublas / t_ours,
                         f"{cfg.kind} {cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}", f"{err:.1e}"])
            print(rows[-1], flush=True)
            if args.sweep and m in args.sweep_rows:
                for c in grid():
                    if not supported(x, ws[0], c) or (gated and c.block_n < (32 if c.kind == "dot" else 2)):
                        continue
                    try:
                        t = time_per_call(lambda x, w, c=c, g=gated: skinny_linear(x, w, cfg=c, gated=g), ws, x, args.calls)
                    except Exception as e:  # e.g. triton OutOfResources (shared memory) for big tiles
                        print(f"skip {c}: {type(e).__name__}", flush=True)
                        continue
                    sweep_rows.append([name, m, f"{c.kind} {c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}",
                                       nbytes / t / 1e9, t_cublas / t])
        del ws
        torch.cuda.empty_cache()
    lines.append(markdown_table(
        ["shape", "M", "cuBLAS GB/s", "ours GB/s", "cuBLAS time / ours", "config", "max rel err"], rows))
    if sweep_rows:
        lines += ["", "Sweep: the 5 fastest configurations per shape and M:", ""]
        best = []
        for name in args.shapes:
            for m in args.sweep_rows:
                best += sorted((r for r in sweep_rows if r[0] == name and r[1] == m), key=lambda r: -r[3])[:5]
        lines.append(markdown_table(["shape", "M", "config", "GB/s", "cuBLAS time / ours"], best))
    body = "\n".join(lines)
    print(body)
    if args.out:
        append_section(args.out, "Skinny matmul vs cuBLAS", body)


if __name__ == "__main__":
    main()
