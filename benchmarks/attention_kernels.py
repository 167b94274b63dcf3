"""Triton attention kernels on CUDA: achieved KV-read GB/s (decode) and TFLOP/s (extend) next to
what the same GPU does for a device-to-device copy and a bf16 matmul, measured in the same run.

    .venv/bin/python benchmarks/attention_kernels.py
    .venv/bin/python benchmarks/attention_kernels.py --batch-size 1 8 64 256 --context 1024 4096 --out benchmarks/results/today.md

Shape: Llama-3-8B attention (32 q heads, 8 KV heads, head_dim 128), bf16, page size 16 with
shuffled pages (every KV read is a gather through the request-to-token table).

Decode: one query token per request, every request at the same context length; bytes = the K and
V of every context token (the query, table and output are negligible). Next to it the torch_native
backend's padded-SDPA decode on the same inputs. Extend: a batch of prompts with an optional cached
prefix; FLOPs = 4 * H * D * (keys each query sees, causal), i.e. QK^T and PV without the masked half.

Timings are ``triton.testing.do_bench`` medians (it flushes L2 between runs, so small contexts do
not read from cache). Copy bandwidth counts read + write bytes of a 1 GiB copy.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from itertools import product
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_section, markdown_table  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
EXTEND_POINTS = [(1, 0, 4096), (4, 0, 2048), (8, 0, 1024), (16, 0, 512), (8, 2048, 512), (1, 7168, 1024)]  # (batch, prefix, extend)


def bench_ms(fn: Any) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_gbs() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e6


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / bench_ms(lambda: a @ b) / 1e9


def paged_kv(seqs: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V as the engine's page-major pool gives them (strided views ``[pages, PAGE, KVH, D]`` of one
    ``[pages, layers=1, 2, PAGE, KVH, D]`` buffer) and a ``[B, max_seq]`` table of shuffled pages."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pages_per = [-(-s // PAGE) for s in seqs]
    num_pages = sum(pages_per) + 1
    buf = torch.randn((num_pages, 1, 2, PAGE, KV_HEADS, HEAD_DIM), generator=gen, device="cuda", dtype=torch.bfloat16)
    k, v = buf[:, 0, 0], buf[:, 0, 1]
    pages = torch.randperm(num_pages - 1, generator=gen, device="cuda") + 1  # page 0 is padding
    width = max(pages_per) * PAGE
    table = torch.zeros((len(seqs), width), dtype=torch.int64, device="cuda")
    off = 0
    offs = torch.arange(PAGE, device="cuda")
    for i, n in enumerate(pages_per):
        table[i, : n * PAGE] = (pages[off : off + n, None] * PAGE + offs).reshape(-1)
        off += n
    return k, v, table


def decode_inputs(bs: int, ctx: int) -> tuple[Any, ...]:
    """One decode point: paged K/V, query, request rows and lengths (every request at ``ctx``)."""
    k, v, table = paged_kv([ctx] * bs, seed=bs + ctx)
    q = torch.randn((bs, HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16)
    return q, k, v, table, torch.arange(bs, device="cuda"), torch.full((bs,), ctx, device="cuda")


def kv_bytes(bs: int, ctx: int) -> int:
    return bs * ctx * 2 * KV_HEADS * HEAD_DIM * 2


def engine_splits(bs: int) -> int:
    """The split count the backend picks for this batch (``TritonBackend`` defaults)."""
    from sglang.engine.attention.triton.decode import DEFAULT_MAX_KV_SPLITS, device_caps, pick_num_splits

    return pick_num_splits(bs, KV_HEADS, DEFAULT_MAX_KV_SPLITS, device_caps(torch.device("cuda"))[0])


def engine_launch(splits: int) -> dict[str, int]:
    """The decode launch parameters the backend picks (``decode.decode_launch``)."""
    from sglang.engine.attention.triton.decode import decode_launch, device_caps

    return decode_launch(splits, device_caps(torch.device("cuda"))[1])


def decode_rows(batch_sizes: list[int], contexts: list[int], bw: float) -> list[list[Any]]:
    from sglang.engine.attention.triton.decode import decode_attention, decode_scratch

    rows = []
    for ctx, bs in product(contexts, batch_sizes):
        q, k, v, table, req, lens = decode_inputs(bs, ctx)
        splits = engine_splits(bs)
        scratch = decode_scratch(bs * splits, HEADS, HEAD_DIM, torch.device("cuda"))
        ms = bench_ms(partial(decode_attention, q, k, v, table, req, lens, scratch, HEAD_DIM**-0.5, num_splits=splits,
                              **engine_launch(splits)))
        native = native_decode_ms(q, k, v, table, lens)
        gbs = kv_bytes(bs, ctx) / ms / 1e6
        rows.append([bs, ctx, splits, ms * 1e3, gbs, gbs / bw, native * 1e3, native / ms])
    return rows


def decode_sweep(batch_sizes: list[int], contexts: list[int], bw: float, quick: bool = False) -> list[list[Any]]:
    """Every (block_n, num_warps, num_stages) of a small grid at the engine's split count and at
    half and twice it: the three fastest per point, to choose the kernel's launch parameters.
    ``quick``: only the engine's split count and a few candidates, each listed, the engine's marked."""
    from sglang.engine.attention.triton.decode import decode_attention, decode_scratch

    rows = []
    for ctx, bs in product(contexts, batch_sizes):
        q, k, v, table, req, lens = decode_inputs(bs, ctx)
        base = engine_splits(bs)
        found = []
        grid = (list(product((32, 64, 128), (4, 8), (2, 3, 4))) if not quick
                else [(64, 4, 2), (32, 8, 3), (32, 8, 2), (32, 4, 3), (64, 8, 3), (128, 8, 2), (128, 4, 2)])
        for splits in [base] if quick else sorted({max(1, base // 2), base, 2 * base}):
            scratch = decode_scratch(bs * splits, HEADS, HEAD_DIM, torch.device("cuda"))
            for bn, warps, stages in grid:
                fn = partial(decode_attention, q, k, v, table, req, lens, scratch, HEAD_DIM**-0.5,
                             num_splits=splits, block_n=bn, num_warps=warps, num_stages=stages)
                try:
                    ms = bench_ms(fn)
                except Exception as e:  # e.g. out of shared memory
                    print(f"skip bs {bs} ctx {ctx} {splits} {bn} {warps} {stages}: {type(e).__name__}")
                    continue
                found.append((ms, splits, bn, warps, stages))
        for ms, splits, bn, warps, stages in sorted(found)[: len(found) if quick else 3]:
            gbs = kv_bytes(bs, ctx) / ms / 1e6
            mine = engine_launch(splits)
            tag = " (engine)" if (bn, warps, stages) == (mine["block_n"], mine["num_warps"], mine["num_stages"]) else ""
            rows.append([bs, ctx, f"{splits}{tag}", bn, warps, stages, ms * 1e3, gbs, gbs / bw])
    return rows


def native_decode_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> float:
    """The torch_native backend's padded decode on the same tensors (NaN when it runs out of memory)."""
    import torch.nn.functional as F

    k = k.reshape(-1, KV_HEADS, HEAD_DIM)  # token rows (a copy, outside the timed region)
    v = v.reshape(-1, KV_HEADS, HEAD_DIM)

    def run() -> torch.Tensor:
        b, n = table.shape
        flat = table.reshape(-1)
        ki = k.index_select(0, flat).view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
        vi = v.index_select(0, flat).view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
        valid = torch.arange(n, device="cuda")[None, :] < lens[:, None]
        return F.scaled_dot_product_attention(
            q.unsqueeze(2), ki, vi, attn_mask=valid[:, None, None, :], scale=HEAD_DIM**-0.5, enable_gqa=True
        )

    try:
        return bench_ms(run)
    except torch.OutOfMemoryError:
        return float("nan")


def extend_rows(tflops_peak: float) -> list[list[Any]]:
    from sglang.engine.attention.triton.extend import extend_attention, extend_config

    cfg = extend_config(torch.device("cuda"))
    rows = []
    for bs, prefix, ext in EXTEND_POINTS:
        q, k, v, table, tiles = extend_inputs(bs, prefix, ext, cfg["block_rows_"])
        ms = bench_ms(partial(extend_attention, q, k, v, table, tiles, HEAD_DIM**-0.5, **cfg))
        keys_seen = bs * sum(prefix + i + 1 for i in range(ext))
        tflops = 4 * HEADS * HEAD_DIM * keys_seen / ms / 1e9
        rows.append([bs, prefix, ext, ms * 1e3, tflops, tflops / tflops_peak])
    return rows


def extend_inputs(bs: int, prefix: int, ext: int, rows: int) -> tuple[Any, ...]:
    from sglang.engine.attention.triton.extend import extend_tiles

    k, v, table = paged_kv([prefix + ext] * bs, seed=bs + prefix + ext)
    q = torch.randn((bs * ext, HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16)
    tiles = extend_tiles(list(range(bs)), [prefix] * bs, [ext] * bs, HEADS // KV_HEADS, torch.device("cuda"), rows)
    return q, k, v, table, tiles


def extend_sweep(tflops_peak: float) -> list[list[Any]]:
    """Every (query rows, block_n, num_warps, num_stages) of a small grid: the three fastest per
    extend point, plus the engine's default, to choose the extend kernel's launch parameters."""
    from sglang.engine.attention.triton.extend import extend_attention, extend_config

    default = extend_config(torch.device("cuda"))
    out = []
    for bs, prefix, ext in [(8, 0, 1024), (1, 0, 4096), (8, 2048, 512)]:
        keys_seen = bs * sum(prefix + i + 1 for i in range(ext))
        found = []
        for rows, bn, warps, stages in product((64, 128), (32, 64), (4, 8), (2, 3)):
            q, k, v, table, tiles = extend_inputs(bs, prefix, ext, rows)
            fn = partial(extend_attention, q, k, v, table, tiles, HEAD_DIM**-0.5,
                         block_rows_=rows, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                ms = bench_ms(fn)
            except Exception as e:  # e.g. out of shared memory or registers
                print(f"skip extend {bs}/{prefix}/{ext} {rows} {bn} {warps} {stages}: {type(e).__name__}")
                continue
            found.append((ms, rows, bn, warps, stages))
        cfg = (default["block_rows_"], default["block_n"], default["num_warps"], default["num_stages"])
        picked = sorted(found)[:3] + [f for f in found if f[1:] == cfg]
        for ms, rows, bn, warps, stages in picked:
            tflops = 4 * HEADS * HEAD_DIM * keys_seen / ms / 1e9
            tag = " (default)" if (rows, bn, warps, stages) == cfg else ""
            out.append([f"{bs}/{prefix}/{ext}{tag}", rows, bn, warps, stages, ms * 1e3, tflops, tflops / tflops_peak])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--out", help="append the tables to this Markdown file")
    ap.add_argument("--sweep", action="store_true", help="time a grid of decode launch parameters instead")
    ap.add_argument("--quick", action="store_true", help="with --sweep: the engine's splits and a few candidates only")
    ap.add_argument("--sweep-extend", action="store_true", help="time a grid of extend launch parameters instead")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_kernels.py needs a CUDA GPU")
    import triton

    bw, peak = copy_gbs(), matmul_tflops()
    header = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        f"measured copy {bw:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s\n\n"
        f"Shape: {HEADS} q heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, bf16, page {PAGE} (shuffled)\n"
    )
    if args.sweep_extend:
        sweep = markdown_table(["batch/prefix/extend", "rows", "block_n", "warps", "stages", "us", "TFLOP/s", "of matmul"],
                               extend_sweep(peak))
        print(sweep)
        if args.out:
            append_section(args.out, "Extend kernel sweep (triton)", header + "\n" + sweep)
        return
    decode = markdown_table(
        ["batch", "context", "splits", "triton us", "KV GB/s", "of copy", "torch_native us", "speedup"],
        decode_rows(args.batch_size, args.context, bw),
    )
    if args.sweep:
        sweep = markdown_table(["batch", "context", "splits", "block_n", "warps", "stages", "us", "KV GB/s", "of copy"],
                               decode_sweep(args.batch_size, args.context, bw, args.quick))
        print(sweep)
        if args.out:
            append_section(args.out, "Decode kernel sweep (triton)", header + "\n" + sweep)
        return
    extend = markdown_table(["batch", "prefix", "extend", "triton us", "TFLOP/s", "of matmul"], extend_rows(peak))
    body = f"{header}\n### Decode (split-K, splits picked per batch size as in the engine)\n\n{decode}\n\n### Extend (causal)\n\n{extend}\n"
    print(body)
    if args.out:
        append_section(args.out, "Attention kernels (triton)", body)


if __name__ == "__main__":
    main()
