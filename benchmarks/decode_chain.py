"""The batch-1 decode chain without attention: 32 layers of the Llama-3-8B shape's add+RMSNorm and
skinny matmuls (qkv, o, gated gate/up, down), captured in one CUDA graph, with programmatic
dependent launch (PDL) on and off, against the weight-read floor of the same run.

    python benchmarks/decode_chain.py [--layers 32] [--out results.md]

The floor is the chain's weight bytes at the device-to-device copy bandwidth measured in the run
(read + write, as ``one_batch.py``'s roofline). Below 1.0 is possible: a read-only stream is a
little faster than a copy. Each layer has its own weights (no L2 reuse across layers). Also times
each matmul alone (32 calls with their own weights and inputs, in a graph) so the per-kernel
rates can be compared with ``gemv.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "libs"))

from common import append_section, command_line, markdown_table  # noqa: E402
from hardware import git_commit, measure_gpu_bandwidth_gbs  # noqa: E402
from sglang.engine.attention.triton import pdl  # noqa: E402
from sglang.engine.layers import fused  # noqa: E402
from sglang.engine.layers.fused import triton_ops  # noqa: E402

HIDDEN, QKV, INTER = 4096, 6144, 14336


def graph_us(fn, reps: int = 20) -> float:  # type: ignore[no-untyped-def]
    """Microseconds per replay of a CUDA graph of ``fn`` (best of 3 timings of ``reps`` replays)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fused.set_fused_ops(True)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def weight(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)

    layers = [(weight(QKV, HIDDEN), weight(HIDDEN, HIDDEN), weight(2 * INTER, HIDDEN), weight(HIDDEN, INTER))
              for _ in range(args.layers)]
    norm_w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    x0 = torch.randn(1, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
    nbytes = sum(w.numel() * 2 for ws in layers for w in ws)
    bw = measure_gpu_bandwidth_gbs()
    floor_us = nbytes / bw / 1e3

    def linear(x: torch.Tensor, w: torch.Tensor, gated: bool = False) -> torch.Tensor:
        y = fused.try_skinny_linear(x, w, gated=gated)
        if y is None:
            raise RuntimeError("the skinny matmul does not take this shape here")
        return y

    def chain() -> torch.Tensor:
        x, res = x0, x0
        for qkv, o, gate_up, down in layers:
            h, res = triton_ops.fused_add_rmsnorm(x, res, norm_w, 1e-5)
            x = linear(linear(h, qkv)[:, :HIDDEN], o)
            h, res = triton_ops.fused_add_rmsnorm(x, res, norm_w, 1e-5)
            x = linear(linear(h, gate_up, gated=True), down)
        return x

    rows = []
    for on in (False, True):
        pdl.set_pdl(on)
        us = graph_us(chain)
        row = ["on" if on else "off", us, us / floor_us]
        for idx in range(4):
            xs = [torch.randn(1, layers[0][idx].shape[1], device="cuda", dtype=torch.bfloat16) for _ in layers]

            def alone(idx: int = idx, xs: list[torch.Tensor] = xs) -> None:
                for x, ws in zip(xs, layers, strict=True):
                    linear(x, ws[idx], gated=idx == 2)

            t = graph_us(alone) / len(layers)
            row.append(f"{t:.2f} us, {layers[0][idx].numel() * 2 / t / 1e3:.0f} GB/s")
        rows.append(row)
    pdl.set_pdl(None)
    lines = [
        f"GPU: {torch.cuda.get_device_name()}; device-to-device copy {bw:.0f} GB/s (read + write); sglang at {git_commit()}",
        f"`{command_line()}`",
        "",
        f"{args.layers} layers: {nbytes / 1e9:.2f} GB of weights, floor {floor_us:.0f} us at the copy bandwidth",
        "",
        markdown_table(["PDL", "chain us", "chain / floor", "qkv alone", "o alone", "gate_up (gated) alone", "down alone"],
                       rows),
    ]
    body = "\n".join(lines)
    print(body)
    if args.out:
        append_section(args.out, "Batch-1 decode chain (norms + skinny matmuls), PDL off vs on", body)


if __name__ == "__main__":
    main()
