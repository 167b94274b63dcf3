"""Offline throughput on nano-vllm's workload (and a fixed-length one), ours against HF ``generate``.

    .venv/bin/python benchmarks/offline.py                       # nano-vllm's bench: 256 seqs, 100..1024
    .venv/bin/python benchmarks/offline.py --tiny --scale 0.25   # 64 seqs, lengths 25..256
    .venv/bin/python benchmarks/offline.py --scale 0.0625 --out benchmarks/results/today.md
    python benchmarks/offline.py --device cuda --model-shape llama3-8b --workload fixed nano \
        --requests 1000 --input-len 1024 --output-len 256 --hf-requests 64

Workloads (``--workload``, one or more, run one after the other on the same engine):

``fixed``: ``--requests`` prompts of ``--input-len`` random token ids (below 10000, seeded), each
generating exactly ``--output-len`` tokens (``ignore_eos``).

``nano`` (the default): nano-vllm's ``bench.py``: ``random.seed(0)``; ``num_seqs`` prompts of random token
ids below 10000, each of a length uniform in [min_len, max_len]; then for each sequence an output
length uniform in the same range; temperature 0.6, ``ignore_eos``; throughput = requested output
tokens / wall time of one ``generate`` call with everything submitted at once (after a warm-up).
``--scale F`` shrinks it for a CPU: ``round(F * num_seqs)`` sequences, lengths in
``[round(F * min_len), round(F * max_len)]`` (0.0625 gives 16 sequences in [6, 64]).

Ours: ``engine.generate(input_ids=[...], sampling_params=[...])``, without a tokenizer by default
(HF returns ids too; ``--detokenize`` adds our incremental detokenizer to the work). ``--stream``
runs the same call streaming and reports TTFT and ITL percentiles as well.

HF baseline, same process and weights (``from_config`` with random weights for a
``--model-shape``), run after our engine has been shut down: ``generate`` on the first
``--hf-requests`` requests (default: all; one count per workload, 0 = none) in static batches of ``--hf-batch`` in request order,
left-padded with an attention mask, ``max_new_tokens = min_new_tokens`` = the longest request of
the batch; only the requested tokens count as useful. The ratio ours/HF compares our output tok/s
on the whole workload with HF's on that subset.

Roofline (design rule 12), printed next to the result: prompt FLOPs / the measured matmul rate,
plus, for every decode step our engine actually ran (its batch size and the contexts of its
requests, recorded by wrapping ``runner.forward``), max(bytes the step must read / the measured
bandwidth, its FLOPs / the matmul rate) -- bytes: every weight once + the K/V of every context
token; in practice decode is memory-bound and this is the "decode bytes at the measured
bandwidth" of issue 7. The number of decode steps is our scheduler's (printed, with the mean
decode batch); the KV bytes do not depend on it. Prompt FLOPs count each prompt once (no credit
for recomputation after a retraction).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    BenchModel,
    Hardware,
    LoadMeter,
    ModelCost,
    add_model_args,
    append_section,
    engine_kwargs,
    engine_label,
    finish_model_args,
    free_engine,
    hardware_info,
    has_tokenizer,
    load_hf_baseline,
    markdown_table,
    prepare_model,
    release_memory,
    sync,
    wait_for_quiet,
)
from step_recorder import StepRecorder  # noqa: E402

NAN = float("nan")


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    min_len: int
    max_len: int
    name: str = ""

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", nargs="+", default=["nano"], choices=["nano", "fixed"],
                   help="nano: nano-vllm's bench; fixed: --requests x --input-len / --output-len")
    p.add_argument("--num-seqs", type=int, default=256, help="nano: sequences")
    p.add_argument("--min-len", type=int, default=100, help="nano: shortest input and output")
    p.add_argument("--max-len", type=int, default=1024, help="nano: longest input and output")
    p.add_argument("--scale", type=float, default=1.0, help="nano: multiply num-seqs and both lengths by this")
    p.add_argument("--requests", type=int, default=1000, help="fixed: requests")
    p.add_argument("--input-len", type=int, default=1024, help="fixed: prompt tokens per request")
    p.add_argument("--output-len", type=int, default=256, help="fixed: output tokens per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.6, help="nano-vllm's bench samples at 0.6")
    add_model_args(p)
    p.add_argument("--max-running-requests", type=int, default=256)
    p.add_argument("--chunked-prefill-size", type=int, default=None, help="default: 2048 on cpu, 8192 on cuda")
    p.add_argument("--max-prefill-tokens", type=int, default=None, help="default: 16384 on cpu, 8192 on cuda")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="CPU KV pool size")
    p.add_argument("--detokenize", action="store_true", help="load the tokenizer and detokenize as we go")
    p.add_argument("--stream", action="store_true", help="stream, and report TTFT / ITL percentiles")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-batch", type=int, default=None, help="HF static batch (default: 16 on cpu, 64 on cuda)")
    p.add_argument("--hf-requests", type=int, nargs="+", default=None,
                   help="HF runs the first N requests of a workload (default: all); one N for every "
                        "workload or one per --workload, in order; 0 skips HF for that workload")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each measurement wait up to S seconds for other processes to go quiet")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile-launches", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                   help="run torch.profiler from forward call FIRST to LAST and report kernels and GPU idle gaps")
    p.add_argument("--out", default=None, help="append a Markdown section to this file")
    args = p.parse_args(argv)
    finish_model_args(p, args)
    if not 0 < args.scale <= 1 or args.min_len < 1 or args.max_len < args.min_len:
        p.error("need 0 < --scale <= 1 and 1 <= --min-len <= --max-len")
    if min(args.requests, args.input_len, args.output_len) < 1:
        p.error("--requests, --input-len and --output-len must be >= 1")
    gpu = args.device == "cuda"
    args.chunked_prefill_size = args.chunked_prefill_size or (8192 if gpu else 2048)
    args.max_prefill_tokens = args.max_prefill_tokens or (8192 if gpu else 16384)
    args.hf_batch = args.hf_batch or (64 if gpu else 16)
    args.workload = list(dict.fromkeys(args.workload))
    hf_n = args.hf_requests or [-1]
    if len(hf_n) == 1:
        hf_n = hf_n * len(args.workload)
    if len(hf_n) != len(args.workload) or min(hf_n) < -1 or -1 in (args.hf_requests or []):
        p.error("--hf-requests: one count >= 0, or one per --workload")
    args.hf_requests = [None if n < 0 else n for n in hf_n]  # None: all requests
    return args


def make_workload(args: argparse.Namespace, vocab: int) -> Workload:
    """nano-vllm's draws, in nano-vllm's order, scaled."""
    n = max(1, round(args.num_seqs * args.scale))
    lo = max(1, round(args.min_len * args.scale))
    hi = max(lo, round(args.max_len * args.scale))
    top_id = min(10_000, vocab - 1)
    rng = random.Random(args.seed)
    prompts = [[rng.randint(0, top_id) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    out_lens = [rng.randint(lo, hi) for _ in range(n)]
    return Workload(prompts, out_lens, lo, hi, f"nano-vllm x {args.scale:g}")


def make_fixed_workload(args: argparse.Namespace, vocab: int) -> Workload:
    """``--requests`` random prompts of exactly ``--input-len`` tokens, ``--output-len`` outputs."""
    top_id = min(10_000, vocab - 1)
    rng = random.Random(args.seed + 1)
    prompts = [[rng.randint(0, top_id) for _ in range(args.input_len)] for _ in range(args.requests)]
    return Workload(prompts, [args.output_len] * args.requests, args.input_len, args.input_len,
                    f"fixed {args.input_len}/{args.output_len}")


def describe(w: Workload, args: argparse.Namespace) -> str:
    if w.name.startswith("fixed"):
        lengths = f"input {args.input_len}, output {args.output_len} tokens each"
    else:
        lengths = f"seed {args.seed}, input and output lengths uniform in [{w.min_len}, {w.max_len}]"
    return (
        f"workload {w.name}: {len(w.prompts)} seqs, {lengths}; {w.prompt_tokens} prompt tokens, "
        f"{w.output_tokens} output tokens; temperature {args.temperature:g}, ignore_eos"
    )


# ---- ours ------------------------------------------------------------------------------------
def make_engine(model: BenchModel, args: argparse.Namespace) -> Any:
    import sglang

    kw = engine_kwargs(args, model)
    if args.device == "cpu":
        kw["cpu_kv_cache_gib"] = args.kv_cache_gib
    return sglang.Engine(
        model.path,
        skip_tokenizer_init=not (args.detokenize and has_tokenizer(model.path)),
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        max_prefill_tokens=args.max_prefill_tokens,
        **kw,
    )


def _params(w: Workload, temperature: float) -> list[dict[str, Any]]:
    return [{"max_new_tokens": n, "temperature": temperature, "ignore_eos": True} for n in w.output_lens]


def run_ours(engine: Any, w: Workload, temperature: float, device: str = "cpu") -> float:
    sync(device)
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=w.prompts, sampling_params=_params(w, temperature))
    sync(device)
    elapsed = time.perf_counter() - t0
    got = [o["meta_info"]["completion_tokens"] for o in outs]
    if got != w.output_lens:
        bad = sum(g != e for g, e in zip(got, w.output_lens, strict=True))
        raise RuntimeError(f"{bad} requests did not generate their requested length")
    return elapsed


def run_ours_stream(engine: Any, w: Workload, temperature: float) -> tuple[float, list[float], list[float]]:
    """Elapsed seconds, TTFT per request, and inter-token latencies (per token, spread evenly when
    one snapshot brings several)."""
    n = len(w.prompts)
    first: list[float | None] = [None] * n
    last = [0.0] * n
    seen = [0] * n
    itl: list[float] = []
    t0 = time.perf_counter()
    for out in engine.generate(input_ids=w.prompts, sampling_params=_params(w, temperature), stream=True):
        now = time.perf_counter()
        i = out["index"]
        k = len(out["output_ids"])
        if k > seen[i]:
            if first[i] is None:
                first[i] = now - t0
            else:
                gap = (now - last[i]) / (k - seen[i])
                itl.extend([gap] * (k - seen[i]))
            seen[i], last[i] = k, now
    elapsed = time.perf_counter() - t0
    if seen != w.output_lens:
        raise RuntimeError("streamed outputs do not have the requested lengths")
    return elapsed, [f for f in first if f is not None], itl


# ---- HF --------------------------------------------------------------------------------------
def run_hf(model: Any, w: Workload, batch: int, temperature: float) -> tuple[float, int]:
    """Elapsed seconds and tokens generated in all (useful + padding of shorter requests)."""
    device = str(model.device)
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else int(pad)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    generated = 0
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(w.prompts), batch):
            prompts = w.prompts[b : b + batch]
            want = max(w.output_lens[b : b + batch])
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(prompts):
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            out = model.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=want, min_new_tokens=want,
                pad_token_id=pad, use_cache=True, **sampling,
            )
            if out.shape[1] - width != want:
                raise RuntimeError(f"HF generated {out.shape[1] - width} tokens, expected {want}")
            generated += want * len(prompts)
    sync(device)
    return time.perf_counter() - t0, generated


# ---- report ----------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, round(q / 100 * (len(ys) - 1))))]


@dataclass
class Result:
    w: Workload
    ours_s: float
    steps: int
    retractions: int
    others_cores: float
    rec: StepRecorder
    ttft: list[float]
    itl: list[float]
    hf_requests: int = 0
    hf_s: float = NAN
    hf_tps: float = NAN
    hf_raw_tps: float = NAN
    hf_flops: float = NAN
    hf_others: float = NAN


def useful_flops(w: Workload, cost: ModelCost) -> float:
    """Each request computes prompt + output - 1 tokens and samples ``output`` logits rows."""
    return sum(
        cost.forward_flops(len(p) + o - 1, len(p) + o - 1, o) for p, o in zip(w.prompts, w.output_lens, strict=True)
    )


def prompt_flops(w: Workload, cost: ModelCost) -> float:
    return sum(cost.forward_flops(len(p), len(p), 1) for p in w.prompts)


def subset(w: Workload, n: int | None) -> Workload:
    if n is None or n >= len(w.prompts):
        return w
    return Workload(w.prompts[:n], w.output_lens[:n], w.min_len, w.max_len, w.name)


def run_workload(engine: Any, w: Workload, args: argparse.Namespace) -> Result:
    before = engine.get_stats()
    wait_for_quiet(args.wait_quiet)
    meter = LoadMeter()
    ttft: list[float] = []
    itl: list[float] = []
    rec = StepRecorder(tuple(args.profile_launches) if args.profile_launches else None)
    with rec.attach(engine):
        rec.start = time.perf_counter()
        if args.stream:
            ours_s, ttft, itl = run_ours_stream(engine, w, args.temperature)
        else:
            ours_s = run_ours(engine, w, args.temperature, args.device)
        rec.end = time.perf_counter()
    others = meter.others_cores()
    after = engine.get_stats()
    engine.flush_cache()  # the next workload starts cold
    steps = after["num_steps"] - before["num_steps"]
    retractions = after["num_retractions"] - before["num_retractions"]
    print(
        f"{w.name}: ours {ours_s:.2f} s, {w.output_tokens / ours_s:.1f} output tok/s ({steps} steps, "
        f"{retractions} retractions)",
        flush=True,
    )
    return Result(w, ours_s, steps, retractions, others, rec, ttft, itl)


def run_hf_all(model: BenchModel, dtype: torch.dtype, args: argparse.Namespace, results: list[Result],
               cost: ModelCost) -> None:
    hf = load_hf_baseline(model, dtype, args.device)
    warm = Workload([[1] * 16 for _ in range(4)], [4] * 4, 4, 16)
    run_hf(hf, warm, args.hf_batch, args.temperature)
    for r, n in zip(results, args.hf_requests, strict=True):
        if n == 0:
            continue
        sub = subset(r.w, n)
        wait_for_quiet(args.wait_quiet)
        meter = LoadMeter()
        hf_s, generated = run_hf(hf, sub, args.hf_batch, args.temperature)
        r.hf_others = meter.others_cores()
        r.hf_requests, r.hf_s = len(sub.prompts), hf_s
        r.hf_tps, r.hf_raw_tps = sub.output_tokens / hf_s, generated / hf_s
        r.hf_flops = useful_flops(sub, cost)
        print(
            f"{r.w.name}: HF on {len(sub.prompts)} requests {hf_s:.2f} s, {r.hf_tps:.1f} useful tok/s "
            f"({r.hf_raw_tps:.1f} incl. padding)",
            flush=True,
        )
    del hf


def report(r: Result, args: argparse.Namespace, cost: ModelCost, hw: Hardware) -> str:
    w = r.w
    unit, prefix = (1e12, "T") if hw.on_gpu else (1e9, "G")
    ours_flops = useful_flops(w, cost)
    ours_tps = w.output_tokens / r.ours_s
    total_tps = (w.prompt_tokens + w.output_tokens) / r.ours_s
    hf_total = (
        (sum(len(p) for p in w.prompts[: r.hf_requests]) + sum(w.output_lens[: r.hf_requests])) / r.hf_s
        if r.hf_requests else NAN
    )
    ours_row: list[Any] = [
        "ours (continuous batching)", len(w.prompts), r.ours_s, ours_tps, total_tps, NAN,
        ours_flops / r.ours_s / unit, ours_flops / r.ours_s / 1e9 / hw.matmul_gflops,
    ]
    hf_row: list[Any] = [
        f"HF generate, static batches of {min(args.hf_batch, r.hf_requests or args.hf_batch)}", r.hf_requests or "-", r.hf_s, r.hf_tps, hf_total,
        r.hf_raw_tps, r.hf_flops / r.hf_s / unit, r.hf_flops / r.hf_s / 1e9 / hw.matmul_gflops,
    ]
    headers = ["engine", "requests", "time s", "output tok/s", "total tok/s", "tok/s incl. padding",
               f"useful {prefix}FLOP/s", "/ matmul rate"]
    if not hw.on_gpu:
        ours_row.append(r.others_cores)
        hf_row.append(r.hf_others)
        headers.append("others' load (cores)")
    lines = [describe(w, args), markdown_table(headers, [ours_row, hf_row])]

    pf = prompt_flops(w, cost)
    prefill_s = pf / (hw.matmul_gflops * 1e9)
    decode_s, decode_b, _ = r.rec.decode_floor_s(cost, hw)
    floor_s = prefill_s + decode_s
    n_dec = len(r.rec.decode)
    mean_bs = sum(b for b, _ in r.rec.decode) / n_dec if n_dec else NAN
    min_steps = max(max(w.output_lens) - 1, -(-sum(o - 1 for o in w.output_lens) // args.max_running_requests))
    lines.append(
        f"roofline: prompts {pf / unit:.3g} {prefix}FLOP at {hw.matmul_gflops * 1e9 / unit:.3g} {prefix}FLOP/s "
        f"= {prefill_s:.2f} s, plus {n_dec} decode steps (mean batch {mean_bs:.1f}; at least {min_steps} "
        f"with {args.max_running_requests} running) reading {decode_b / 1e9:.1f} GB at "
        f"{hw.bandwidth_gbs:.0f} GB/s = {decode_s:.2f} s; floor {floor_s:.2f} s = "
        f"{w.output_tokens / floor_s:.0f} output tok/s. **Achieved {floor_s / r.ours_s:.1%} of the roofline** "
        f"({r.ours_s:.2f} s; {r.rec.extend_steps} prefill steps, {r.retractions} retractions)"
    )
    head, ext, dec, tail = r.rec.wall_split()
    n_ext = max(r.rec.extend_steps, 1)
    lines.append(
        f"where the wall time went: {head:.2f} s before the first forward, {ext:.2f} s from prefill "
        f"launches to the next launch ({ext / n_ext * 1e3:.1f} ms each), {dec:.2f} s from decode launches "
        f"({dec / max(n_dec, 1) * 1e3:.2f} ms each; decode floor {decode_s / max(n_dec, 1) * 1e3:.2f} ms), "
        f"{tail:.2f} s after the last launch; prefill at {prefill_s / ext if ext else NAN:.3f} of the matmul "
        f"rate, decode at {dec / decode_s if decode_s else NAN:.2f}x its floor"
    )
    ext_l, dec_l = r.rec.intervals()
    if ext_l and dec_l:
        ext_ms = [x * 1e3 for x in ext_l]
        dec_ms = [x * 1e3 for x in dec_l]
        dec_med = pct(dec_ms, 50)
        lines.append(
            f"launch intervals: prefill p10/p50/p90/max {pct(ext_ms, 10):.1f} / {pct(ext_ms, 50):.1f} / "
            f"{pct(ext_ms, 90):.1f} / {max(ext_ms):.1f} ms; decode {pct(dec_ms, 10):.2f} / {pct(dec_ms, 50):.2f} / "
            f"{pct(dec_ms, 90):.2f} / {max(dec_ms):.2f} ms (decode time above its median: "
            f"{sum(max(x - dec_med, 0.0) for x in dec_ms) / 1e3:.2f} s)"
        )
    if r.rec.profile_report:
        lines.append(r.rec.profile_report)
    if r.hf_requests:
        lines.append(
            f"ratio ours/HF output tok/s: **{ours_tps / r.hf_tps:.2f}x** (HF on the first {r.hf_requests} "
            f"requests in static batches of {min(args.hf_batch, r.hf_requests)})"
        )
    if args.stream:
        ttft, itl = r.ttft, r.itl
        lines.append(
            f"streaming: TTFT p50 {pct(ttft, 50) * 1e3:.0f} ms, p90 {pct(ttft, 90) * 1e3:.0f} ms, "
            f"p99 {pct(ttft, 99) * 1e3:.0f} ms; ITL p50 {pct(itl, 50) * 1e3:.1f} ms, "
            f"p90 {pct(itl, 90) * 1e3:.1f} ms, p99 {pct(itl, 99) * 1e3:.1f} ms, "
            f"mean {statistics.fmean(itl) * 1e3 if itl else NAN:.1f} ms"
        )
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype, model, config, cost = prepare_model(args)
    makers = {"nano": make_workload, "fixed": make_fixed_workload}
    workloads = [makers[name](args, cost.vocab) for name in args.workload]
    ctx = int(getattr(config, "max_position_embeddings", 0) or 0)
    for w in workloads:
        longest = max(len(p) + o for p, o in zip(w.prompts, w.output_lens, strict=True))
        if ctx and longest > ctx:
            raise SystemExit(f"{w.name}: prompt + output up to {longest} tokens exceed the model's context {ctx}")
    hw = hardware_info(dtype, args.wait_quiet, args.device)
    header = [
        f"model: {model.name} ({cost.num_params / 1e6:.1f}M params, {args.dtype}) at {model.path}",
        f"hardware: {hw.line()}",
        f"{hw.roof_line()}; sglang at {hw.commit}",
        f"engine: {engine_label(args)}, "
        f"max_running_requests {args.max_running_requests}, chunked_prefill_size {args.chunked_prefill_size}, "
        f"max_prefill_tokens {args.max_prefill_tokens}",
    ]
    print("\n".join(header), flush=True)

    engine = make_engine(model, args)
    # Warm-up: allocator growth, kernel selection, Triton compilation (a small batch, then on a GPU
    # one prefill chunk of long prompts); the cache is flushed so that nothing is reused later.
    run_ours(engine, Workload([[1] * 16 for _ in range(4)], [4] * 4, 4, 16), args.temperature, args.device)
    if args.device == "cuda":
        longest = max(len(p) for w in workloads for p in w.prompts)
        n_fill = max(1, min(args.max_running_requests, args.chunked_prefill_size // longest))
        rng = random.Random(args.seed + 7)
        fill = [[rng.randint(0, min(10_000, cost.vocab - 1)) for _ in range(longest)] for _ in range(n_fill)]
        run_ours(engine, Workload(fill, [2] * n_fill, longest, longest), args.temperature, args.device)
    engine.flush_cache()
    results = [run_workload(engine, w, args) for w in workloads]
    # HF runs after our engine is gone: on a GPU both would not fit next to each other.
    free_engine(engine)
    del engine
    release_memory()
    if not args.skip_hf and any(n != 0 for n in args.hf_requests):
        run_hf_all(model, dtype, args, results, cost)

    report_text = "\n\n".join(report(r, args, cost, hw) for r in results)
    print("\n" + report_text, flush=True)
    if args.out:
        body = "\n".join(f"- {h}" for h in header) + "\n\n" + report_text
        names = ", ".join(w.name for w in workloads)
        append_section(args.out, f"offline: {model.name}, {args.dtype}, {args.device}, {names}", body)
        print(f"\nappended to {args.out}")


if __name__ == "__main__":
    main()
