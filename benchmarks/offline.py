"""Offline throughput on nano-vllm's workload, ours against HF transformers ``generate``.

    .venv/bin/python benchmarks/offline.py                       # nano-vllm's bench: 256 seqs, 100..1024
    .venv/bin/python benchmarks/offline.py --tiny --scale 0.25   # 64 seqs, lengths 25..256
    .venv/bin/python benchmarks/offline.py --scale 0.0625 --out benchmarks/results/today.md

The workload is nano-vllm's ``bench.py``: ``random.seed(0)``; ``num_seqs`` prompts of random token
ids below 10000, each of a length uniform in [min_len, max_len]; then for each sequence an output
length uniform in the same range; temperature 0.6, ``ignore_eos``; throughput = requested output
tokens / wall time of one ``generate`` call with everything submitted at once (after a warm-up).
``--scale F`` shrinks it for a CPU: ``round(F * num_seqs)`` sequences, lengths in
``[round(F * min_len), round(F * max_len)]`` (0.0625 gives 16 sequences in [6, 64]).

Ours: ``engine.generate(input_ids=[...], sampling_params=[...])``, without a tokenizer by default
(HF returns ids too; ``--detokenize`` adds our incremental detokenizer to the work). ``--stream``
runs the same call streaming and reports TTFT and ITL percentiles as well.

HF baseline, same process and weights: ``generate`` in static batches of ``--hf-batch`` in request
order, left-padded with an attention mask, ``max_new_tokens = min_new_tokens`` = the longest
request of the batch; only the requested tokens count as useful.
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
    LoadMeter,
    ModelCost,
    append_section,
    hardware_info,
    has_tokenizer,
    load_hf_config,
    load_hf_model,
    markdown_table,
    quiet_logs,
    resolve_model,
    torch_dtype,
    wait_for_quiet,
)


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    min_len: int
    max_len: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--scale", type=float, default=1.0, help="multiply num-seqs and both lengths by this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.6, help="nano-vllm's bench samples at 0.6")
    p.add_argument("--model-path", default=None, help="HF folder; default: SmolLM2-135M-Instruct")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (built once into the cache)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention-backend", default="torch_native")
    p.add_argument("--max-running-requests", type=int, default=256)
    p.add_argument("--chunked-prefill-size", type=int, default=2048)
    p.add_argument("--max-prefill-tokens", type=int, default=16384)
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="CPU KV pool size")
    p.add_argument("--detokenize", action="store_true", help="load the tokenizer and detokenize as we go")
    p.add_argument("--stream", action="store_true", help="stream, and report TTFT / ITL percentiles")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each measurement wait up to S seconds for other processes to go quiet")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append a Markdown section to this file")
    args = p.parse_args(argv)
    if args.tiny and args.model_path:
        p.error("--tiny and --model-path exclude each other")
    if not 0 < args.scale <= 1 or args.min_len < 1 or args.max_len < args.min_len:
        p.error("need 0 < --scale <= 1 and 1 <= --min-len <= --max-len")
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
    return Workload(prompts, out_lens, lo, hi)


# ---- ours ------------------------------------------------------------------------------------
def make_engine(path: str, args: argparse.Namespace) -> Any:
    import sglang

    return sglang.Engine(
        path,
        dtype=args.dtype,
        device="cpu",
        skip_tokenizer_init=not (args.detokenize and has_tokenizer(path)),
        attention_backend=args.attention_backend,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        max_prefill_tokens=args.max_prefill_tokens,
        cpu_kv_cache_gib=args.kv_cache_gib,
    )


def _params(w: Workload, temperature: float) -> list[dict[str, Any]]:
    return [{"max_new_tokens": n, "temperature": temperature, "ignore_eos": True} for n in w.output_lens]


def run_ours(engine: Any, w: Workload, temperature: float) -> float:
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=w.prompts, sampling_params=_params(w, temperature))
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
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else int(pad)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    generated = 0
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
                ids, attention_mask=mask, max_new_tokens=want, min_new_tokens=want,
                pad_token_id=pad, use_cache=True, **sampling,
            )
            if out.shape[1] - width != want:
                raise RuntimeError(f"HF generated {out.shape[1] - width} tokens, expected {want}")
            generated += want * len(prompts)
    return time.perf_counter() - t0, generated


# ---- report ----------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, round(q / 100 * (len(ys) - 1))))]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    path, name = resolve_model(args.model_path, args.tiny)
    config = load_hf_config(path)
    cost = ModelCost.from_config(config, dtype)
    w = make_workload(args, cost.vocab)
    ctx = int(getattr(config, "max_position_embeddings", 0) or 0)
    if ctx and 2 * w.max_len > ctx:
        raise SystemExit(f"lengths up to {w.max_len} + {w.max_len} exceed the model's context {ctx}")
    hw = hardware_info(dtype, args.wait_quiet)
    header = [
        f"model: {name} ({cost.num_params / 1e6:.1f}M params, {args.dtype}) at {path}",
        f"hardware: {hw.line()}",
        f"{hw.roof_line()}; sglang at {hw.commit}; attention backend {args.attention_backend}",
        f"workload: {len(w.prompts)} seqs (nano-vllm x {args.scale:g}), seed {args.seed}, input and output "
        f"lengths uniform in [{w.min_len}, {w.max_len}]; {w.prompt_tokens} prompt tokens, "
        f"{w.output_tokens} output tokens; temperature {args.temperature:g}, ignore_eos",
    ]
    print("\n".join(header), flush=True)
    # Useful work: each request computes prompt + output - 1 tokens and samples `output` logits rows.
    useful_flops = sum(
        cost.forward_flops(len(p) + o - 1, len(p) + o - 1, o) for p, o in zip(w.prompts, w.output_lens, strict=True)
    )

    engine = make_engine(path, args)
    warm = Workload([[1] * 16 for _ in range(4)], [4] * 4, 4, 16)
    run_ours(engine, warm, args.temperature)
    before = engine.get_stats()
    wait_for_quiet(args.wait_quiet)
    meter = LoadMeter()
    ttft: list[float] = []
    itl: list[float] = []
    if args.stream:
        ours_s, ttft, itl = run_ours_stream(engine, w, args.temperature)
    else:
        ours_s = run_ours(engine, w, args.temperature)
    ours_others = meter.others_cores()
    after = engine.get_stats()
    engine.shutdown()
    del engine
    ours_tps = w.output_tokens / ours_s
    steps = after["num_steps"] - before["num_steps"]
    retractions = after["num_retractions"] - before["num_retractions"]
    print(
        f"ours: {ours_s:.2f} s, {ours_tps:.1f} output tok/s ({steps} steps, {retractions} retractions)", flush=True
    )

    hf_s = hf_tps = hf_raw_tps = hf_others = float("nan")
    if not args.skip_hf:
        model = load_hf_model(path, dtype)
        run_hf(model, warm, args.hf_batch, args.temperature)
        wait_for_quiet(args.wait_quiet)
        meter = LoadMeter()
        hf_s, generated = run_hf(model, w, args.hf_batch, args.temperature)
        hf_others = meter.others_cores()
        hf_tps, hf_raw_tps = w.output_tokens / hf_s, generated / hf_s
        print(f"HF: {hf_s:.2f} s, {hf_tps:.1f} useful tok/s ({hf_raw_tps:.1f} incl. padding)", flush=True)
        del model

    rows = [
        ["ours (continuous batching)", ours_s, ours_tps, float("nan"), useful_flops / ours_s / 1e9,
         100 * useful_flops / ours_s / 1e9 / hw.matmul_gflops, ours_others],
        [f"HF generate, static batches of {args.hf_batch}", hf_s, hf_tps, hf_raw_tps,
         useful_flops / hf_s / 1e9, 100 * useful_flops / hf_s / 1e9 / hw.matmul_gflops, hf_others],
    ]
    table = markdown_table(
        ["engine", "time s", "output tok/s", "tok/s incl. padding", "useful GFLOP/s", "% of matmul peak",
         "others' load (cores)"],
        rows,
    )
    lines = [table, ""]
    if hf_tps == hf_tps:  # not NaN
        lines.append(f"ratio ours/HF throughput: {ours_tps / hf_tps:.2f}x")
    lines.append(f"ours: {steps} engine steps, {retractions} retractions; useful work {useful_flops / 1e12:.3f} TFLOP")
    if args.stream:
        lines.append(
            f"streaming: TTFT p50 {pct(ttft, 50) * 1e3:.0f} ms, p90 {pct(ttft, 90) * 1e3:.0f} ms, "
            f"p99 {pct(ttft, 99) * 1e3:.0f} ms; ITL p50 {pct(itl, 50) * 1e3:.1f} ms, "
            f"p90 {pct(itl, 90) * 1e3:.1f} ms, p99 {pct(itl, 99) * 1e3:.1f} ms, "
            f"mean {statistics.fmean(itl) * 1e3 if itl else float('nan'):.1f} ms"
        )
    report = "\n\n".join(x for x in lines if x)
    print("\n" + report, flush=True)
    if args.out:
        body = "\n".join(f"- {h}" for h in header) + "\n\n" + report
        append_section(args.out, f"offline: {name}, {args.dtype}, scale {args.scale:g}", body)
        print(f"\nappended to {args.out}")


if __name__ == "__main__":
    main()
