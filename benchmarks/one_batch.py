"""One static batch: prefill time and decode time per step, ours against HF transformers ``generate``.

    .venv/bin/python benchmarks/one_batch.py --batch-size 1 8 --input-len 128 512 --output-len 32
    .venv/bin/python benchmarks/one_batch.py --tiny --out benchmarks/results/today.md
    .venv/bin/python benchmarks/one_batch.py --batch-size 8 --input-len 512 --skip-hf --profile

For every (batch size, input length, output length) point, ``bs`` prompts of random token ids
(seeded, all the same length, so HF needs no padding) are generated greedily with ``ignore_eos``.

Ours: the scheduler is driven directly on its own thread (``engine._loop.call``): the requests are
added, one ``step()`` computes every prompt (chunked prefill and admission limits are set large
enough; the script checks that it was one step) -- that is the prefill time -- and then each
decode ``step()`` is timed; decode time is the median step.

HF: ``AutoModelForCausalLM.from_pretrained`` on the same folder and dtype. Prefill is
``generate(max_new_tokens=1)``; decode per step is ``(generate(max_new_tokens=out,
min_new_tokens=out) - prefill) / (out - 1)``.

Next to the timings the script prints what the hardware allows (design rule 12): the measured copy
bandwidth and the bytes a decode step must read (every weight once plus the KV cache) give a floor
in ms/step; prefill FLOPs over the measured matmul throughput give the compute side.

``--profile`` then profiles our prefill and decode steps at the last point: a phase breakdown
(schedule, input building, forward with attention and LM head, sampling, update), torch.profiler's
top operators, and cProfile's top Python functions.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Hardware,
    LoadMeter,
    ModelCost,
    append_section,
    hardware_info,
    load_hf_config,
    load_hf_model,
    markdown_table,
    quiet_logs,
    resolve_model,
    torch_dtype,
    wait_for_quiet,
)

NAN = float("nan")


@dataclass
class Point:
    bs: int
    input_len: int
    output_len: int
    ours_prefill_s: float = NAN
    ours_decode_s: float = NAN  # median per step
    hf_prefill_s: float = NAN
    hf_decode_s: float = NAN
    others_cores: float = NAN  # CPU used by other processes during the point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--output-len", type=int, nargs="+", default=[32])
    p.add_argument("--model-path", default=None, help="HF folder; default: SmolLM2-135M-Instruct")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (built once into the cache)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention-backend", default="torch_native")
    p.add_argument("--skip-hf", action="store_true", help="do not run HF transformers")
    p.add_argument("--repeats", type=int, default=1, help="run each point this many times; best prefill, median decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each measurement wait up to S seconds for other processes to go quiet")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="profile our prefill and decode steps at the last point")
    p.add_argument("--profile-steps", type=int, default=8, help="decode steps in the phase breakdown")
    p.add_argument("--out", default=None, help="append a Markdown section to this file")
    args = p.parse_args(argv)
    if args.tiny and args.model_path:
        p.error("--tiny and --model-path exclude each other")
    if min(args.output_len) < 2:
        p.error("--output-len must be >= 2 (decode needs at least one step after prefill)")
    return args


def random_prompts(bs: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed * 1_000_003 + bs * 1009 + input_len)
    hi = min(vocab, 10_000) - 1  # nano-vllm draws ids below 10000
    return [[rng.randint(3, hi) for _ in range(input_len)] for _ in range(bs)]


# ---- ours ------------------------------------------------------------------------------------
def make_engine(path: str, args: argparse.Namespace, max_tokens: int, max_bs: int) -> Any:
    import sglang

    return sglang.Engine(
        path,
        dtype=args.dtype,
        device="cpu",
        skip_tokenizer_init=True,
        attention_backend=args.attention_backend,
        chunked_prefill_size=max_tokens,
        max_prefill_tokens=max_tokens,
        max_running_requests=max(max_bs, 1),
        max_total_tokens=max_tokens + 64 * max_bs + 1024,
    )


def _requests(engine: Any, prompts: list[list[int]], output_len: int) -> list[Any]:
    params = [{"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True} for _ in prompts]
    reqs, _ = engine._make_requests(None, prompts, params, False, None, 0, False)
    return list(reqs)


def run_ours(engine: Any, prompts: list[list[int]], output_len: int) -> tuple[float, list[float]]:
    """Prefill seconds and the list of decode-step seconds, measured on the scheduler thread."""
    reqs = _requests(engine, prompts, output_len)

    def body(s: Any) -> tuple[float, list[float]]:
        if s.has_work():
            raise RuntimeError("the scheduler is busy; the benchmark needs it to itself")
        for r in reqs:
            s.add_request(r)
        t0 = time.perf_counter()
        s.step()
        prefill = time.perf_counter() - t0
        bad = [r for r in reqs if r.num_computed != len(r.prompt_ids) or len(r.output_ids) != 1]
        if bad:
            raise RuntimeError(
                f"prefill took more than one step ({len(bad)} of {len(reqs)} requests not prefilled); "
                "raise chunked_prefill_size / max_prefill_tokens / max_total_tokens"
            )
        steps: list[float] = []
        while s.has_work():
            t0 = time.perf_counter()
            s.step()
            steps.append(time.perf_counter() - t0)
        if len(steps) != output_len - 1 or any(len(r.output_ids) != output_len for r in reqs):
            raise RuntimeError(f"expected {output_len - 1} decode steps of batch {len(reqs)}, ran {len(steps)}")
        return prefill, steps

    result: tuple[float, list[float]] = engine._loop.call(body, timeout=None)
    return result


# ---- HF --------------------------------------------------------------------------------------
def run_hf(model: Any, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """HF prefill seconds and decode seconds per step."""
    ids = torch.tensor(prompts, dtype=torch.int64)
    kw: dict[str, Any] = {
        "attention_mask": torch.ones_like(ids),
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": model.generation_config.pad_token_id or 0,
    }
    with torch.inference_mode():
        t0 = time.perf_counter()
        out1 = model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        total = time.perf_counter() - t0
    if out1.shape[1] != ids.shape[1] + 1 or out.shape[1] != ids.shape[1] + output_len:
        raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {output_len}")
    return prefill, (total - prefill) / (output_len - 1)


# ---- profile ---------------------------------------------------------------------------------
class _Timer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

        return timed


@contextlib.contextmanager
def phase_timers(s: Any) -> Iterator[_Timer]:
    """Time the phases of ``s.step()`` by shadowing methods with instance attributes (removed on
    exit; the engine's code is untouched)."""
    runner, backend = s.runner, s.runner.attn_backend
    targets = [
        (s, "schedule", "schedule"),
        (s, "_model_input", "build model input"),
        (runner, "forward", "runner.forward (model + LM head)"),
        (backend, "init_forward_metadata", "forward: attention metadata"),
        (backend, "forward", "forward: attention (all layers)"),
        (runner.model, "compute_logits", "forward: LM head"),
        (s, "_update", "update (incl. sampling)"),
    ]
    timer = _Timer()
    sampler = s.sampler
    for obj, attr, label in targets:
        setattr(obj, attr, timer.wrap(label, getattr(obj, attr)))
    s.sampler = timer.wrap("update: sampler", sampler)
    try:
        yield timer
    finally:
        for obj, attr, _ in targets:
            delattr(obj, attr)
        s.sampler = sampler


def _phase_table(timer: _Timer, wall: float, steps: int) -> str:
    rows: list[list[Any]] = [[k, v / steps * 1e3, 100 * v / wall] for k, v in timer.totals.items()]
    rows.append(["whole step", wall / steps * 1e3, 100.0])
    return markdown_table(["phase", "ms/step", "% of step"], rows)


def op_table(prof: Any, limit: int) -> str:
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [
        [f"`{e.key}`", e.self_cpu_time_total / 1e3, 100 * e.self_cpu_time_total / total, e.count]
        for e in events[:limit]
    ]
    return markdown_table(["operator", "self ms", "% of self time", "calls"], rows)


def cprofile_table(pr: cProfile.Profile, steps: int, limit: int) -> str:
    stats: dict[Any, Any] = pstats.Stats(pr).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.items():
        where = func if file == "~" else f"{_short(file)}:{line}({func})"
        rows.append([f"`{where}`", ncalls / steps, tottime / steps * 1e3, cumtime / steps * 1e3])
    rows.sort(key=lambda r: -r[2])
    return markdown_table(["function", "calls/step", "own ms/step", "cum ms/step"], rows[:limit])


def _short(file: str) -> str:
    for marker in ("/site-packages/", "/libs/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return os.path.basename(file)


def profile_point(engine: Any, prompts: list[list[int]], steps: int) -> str:
    """Prefill and decode of one batch: phase breakdown, torch.profiler's top operators and
    cProfile's top Python functions. Returns a Markdown report."""
    from torch.profiler import ProfilerActivity, profile

    out_len = 2 * steps + 8
    reqs = _requests(engine, prompts, out_len)
    bs, in_len = len(prompts), len(prompts[0])

    def body(s: Any) -> str:
        for r in reqs:
            s.add_request(r)
        lines = [f"### Profile: batch {bs}, input {in_len}", ""]
        with profile(activities=[ProfilerActivity.CPU]) as prof, phase_timers(s) as timer:
            t0 = time.perf_counter()
            s.step()  # prefill
            wall = time.perf_counter() - t0
        lines += ["Prefill step, phases (the profiler runs too, so times are inflated a little):", ""]
        lines += [_phase_table(timer, wall, 1), "", "Prefill step, top operators (torch.profiler):", ""]
        lines += [op_table(prof, 12), ""]

        s.step()  # one decode step, unmeasured
        with phase_timers(s) as timer:
            t0 = time.perf_counter()
            for _ in range(steps):
                s.step()
            wall = time.perf_counter() - t0
        lines += [f"Decode, phases over {steps} steps:", "", _phase_table(timer, wall, steps), ""]

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                s.step()
        lines += ["Decode, top operators over 2 steps (torch.profiler):", "", op_table(prof, 15), ""]

        n_prof = 4
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n_prof):
            s.step()
        pr.disable()
        lines += [f"Decode, top Python functions by own time over {n_prof} steps (cProfile):", ""]
        lines.append(cprofile_table(pr, n_prof, 15))
        while s.has_work():
            s.step()
        return "\n".join(lines)

    report: str = engine._loop.call(body, timeout=None)
    return report


# ---- report ----------------------------------------------------------------------------------
def tables(points: list[Point], cost: ModelCost, hw: Hardware) -> str:
    def ms(x: float) -> float:
        return x * 1e3

    vs_hf = []
    vs_hw = []
    for p in points:
        vs_hf.append([
            p.bs, p.input_len, p.output_len,
            ms(p.ours_prefill_s), ms(p.hf_prefill_s), p.hf_prefill_s / p.ours_prefill_s,
            ms(p.ours_decode_s), ms(p.hf_decode_s), p.hf_decode_s / p.ours_decode_s,
            p.bs / p.ours_decode_s, p.others_cores,
        ])
        ctx = p.input_len + p.output_len // 2  # mean context over the decode steps
        step_bytes = cost.decode_bytes(p.bs, ctx)
        floor_s = step_bytes / (hw.bandwidth_gbs * 1e9)
        prefill_flops = p.bs * cost.forward_flops(p.input_len, p.input_len, 1)
        vs_hw.append([
            p.bs, p.input_len, p.output_len,
            step_bytes / 1e6, ms(floor_s), p.ours_decode_s / floor_s, step_bytes / p.ours_decode_s / 1e9,
            prefill_flops / 1e9, prefill_flops / p.ours_prefill_s / 1e9,
            100 * prefill_flops / p.ours_prefill_s / 1e9 / hw.matmul_gflops,
        ])
    t1 = markdown_table(
        ["bs", "in", "out", "ours prefill ms", "HF prefill ms", "prefill HF/ours",
         "ours decode ms/step", "HF decode ms/step", "decode HF/ours", "ours decode tok/s", "others' load (cores)"],
        vs_hf,
    )
    t2 = markdown_table(
        ["bs", "in", "out", "MB read/step", "floor ms/step", "ours/floor", "ours decode GB/s",
         "prefill GFLOP", "ours prefill GFLOP/s", "% of matmul peak"],
        vs_hw,
    )
    return (
        "Ours against HF transformers `generate` (HF/ours > 1: we are faster):\n\n" + t1
        + f"\n\nAgainst the hardware ({hw.roof_line()}; a decode step must read every weight once "
        "plus the KV cache at the mean decode context, floor = bytes / bandwidth):\n\n" + t2
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    path, name = resolve_model(args.model_path, args.tiny)
    config = load_hf_config(path)
    cost = ModelCost.from_config(config, dtype)
    hw = hardware_info(dtype, args.wait_quiet)
    header = [
        f"model: {name} ({cost.num_params / 1e6:.1f}M params, {args.dtype}, {cost.num_layers} layers, "
        f"hidden {cost.hidden}, vocab {cost.vocab}) at {path}",
        f"hardware: {hw.line()}",
        f"{hw.roof_line()}; sglang at {hw.commit}; attention backend {args.attention_backend}",
    ]
    print("\n".join(header), flush=True)

    grid = [(b, i, o) for b in args.batch_size for i in args.input_len for o in args.output_len]
    max_bs = max(args.batch_size)
    max_tokens = max(b * (i + o) for b, i, o in grid)
    engine = make_engine(path, args, max_tokens, max_bs)
    hf = None if args.skip_hf else load_hf_model(path, dtype)

    # Warm-up: first calls pay for allocator growth and kernel selection.
    warm = random_prompts(max_bs, 16, cost.vocab, args.seed + 1)
    run_ours(engine, warm, 4)
    if hf is not None:
        run_hf(hf, warm, 4)

    points: list[Point] = []
    for bs, in_len, out_len in grid:
        pt = Point(bs, in_len, out_len)
        prompts = random_prompts(bs, in_len, cost.vocab, args.seed)
        prefills, decodes, hf_pre, hf_dec = [], [], [], []
        wait_for_quiet(args.wait_quiet)
        meter = LoadMeter()
        for _ in range(args.repeats):
            pre, steps = run_ours(engine, prompts, out_len)
            prefills.append(pre)
            decodes.append(statistics.median(steps))
            if hf is not None:
                hp, hd = run_hf(hf, prompts, out_len)
                hf_pre.append(hp)
                hf_dec.append(hd)
        pt.ours_prefill_s, pt.ours_decode_s = min(prefills), statistics.median(decodes)
        if hf_pre:
            pt.hf_prefill_s, pt.hf_decode_s = min(hf_pre), statistics.median(hf_dec)
        pt.others_cores = meter.others_cores()
        points.append(pt)
        print(
            f"bs={bs} in={in_len} out={out_len}: ours prefill {pt.ours_prefill_s * 1e3:.1f} ms, "
            f"decode {pt.ours_decode_s * 1e3:.2f} ms/step; HF prefill {pt.hf_prefill_s * 1e3:.1f} ms, "
            f"decode {pt.hf_decode_s * 1e3:.2f} ms/step; other processes used {pt.others_cores:.2f} cores",
            flush=True,
        )

    report = tables(points, cost, hw)
    print("\n" + report, flush=True)
    body = "\n".join(f"- {h}" for h in header) + "\n\n" + report
    if args.profile:
        bs, in_len, _ = grid[-1]
        prof = profile_point(engine, random_prompts(bs, in_len, cost.vocab, args.seed), args.profile_steps)
        print("\n" + prof, flush=True)
        body += "\n\n" + prof
    if args.out:
        append_section(args.out, f"one_batch: {name}, {args.dtype}", body)
        print(f"\nappended to {args.out}")
    engine.shutdown()


if __name__ == "__main__":
    main()
