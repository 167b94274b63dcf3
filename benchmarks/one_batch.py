"""One static batch: prefill time and decode time per step, ours against HF transformers ``generate``.

    .venv/bin/python benchmarks/one_batch.py --batch-size 1 8 --input-len 128 512 --output-len 32
    .venv/bin/python benchmarks/one_batch.py --tiny --out benchmarks/results/today.md
    .venv/bin/python benchmarks/one_batch.py --batch-size 8 --input-len 512 --skip-hf --profile
    python benchmarks/one_batch.py --device cuda --model-shape llama3-8b \
        --batch-size 1 8 64 256 --input-len 1024 --output-len 256 --hf-max-batch 64 --hf-output-len 32

For every (batch size, input length, output length) point, ``bs`` prompts of random token ids
(seeded, all the same length, so HF needs no padding) are generated greedily with ``ignore_eos``.

Ours: the scheduler is driven directly on its own thread (``engine._loop.call``): the requests are
added, ``step()`` runs until every prompt is computed -- one step when the batch's prompt tokens fit
in ``--max-prefill-tokens`` (default 16384), else several; the total is the prefill time -- and
then each decode ``step()`` is timed; decode time is the median step. On cuda every timed region
starts and ends with ``torch.cuda.synchronize()``; the KV pool is sized by
``--mem-fraction-static``, decode replays CUDA graphs (``--disable-cuda-graph`` to compare).

HF: ``from_pretrained`` on the same folder and dtype (``from_config`` with random weights for a
``--model-shape``), on the same device, after our engine has been shut down and its memory freed.
Prefill is ``generate(max_new_tokens=1)``; decode per step is ``(generate(max_new_tokens=n,
min_new_tokens=n) - prefill) / (n - 1)`` with ``n = --hf-output-len`` (default: the output length;
shorter keeps a GPU run short, HF's step time hardly depends on it). Points with a batch above
``--hf-max-batch`` have no HF numbers.

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
    load_hf_baseline,
    markdown_table,
    prepare_model,
    release_memory,
    sync,
    wait_for_quiet,
)

NAN = float("nan")


@dataclass
class Point:
    bs: int
    input_len: int
    output_len: int
    ours_prefill_s: float = NAN
    prefill_steps: int = 0
    ours_decode_s: float = NAN  # median per step
    hf_prefill_s: float = NAN
    hf_decode_s: float = NAN
    others_cores: float = NAN  # CPU used by other processes during the point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--overlap-schedule", default="auto", choices=["auto", "on", "off"],
                   help="overlap scheduling (auto: on for CUDA); run on and off to see its effect")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--output-len", type=int, nargs="+", default=[32])
    add_model_args(p)
    p.add_argument("--max-prefill-tokens", type=int, default=16384,
                   help="prompt tokens per prefill step; a larger batch is prefilled in several steps")
    p.add_argument("--skip-hf", action="store_true", help="do not run HF transformers")
    p.add_argument("--hf-max-batch", type=int, default=None, help="no HF numbers for larger batches")
    p.add_argument("--hf-output-len", type=int, default=None,
                   help="tokens HF generates per point for its decode time (default: the output length)")
    p.add_argument("--repeats", type=int, default=1, help="run each point this many times; best prefill, median decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature for ours and HF (0: greedy; offline.py samples at 0.6)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each measurement wait up to S seconds for other processes to go quiet")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="profile our prefill and decode steps at the last point")
    p.add_argument("--profile-steps", type=int, default=8, help="decode steps in the phase breakdown")
    p.add_argument("--gap-min-us", type=float, default=5.0,
                   help="GPU idle gaps shorter than this are not listed in the profile's gap tables")
    p.add_argument("--out", default=None, help="append a Markdown section to this file")
    args = p.parse_args(argv)
    finish_model_args(p, args)
    if args.hf_output_len is not None and args.hf_output_len < 2:
        p.error("--hf-output-len must be >= 2")
    if min(args.output_len) < 2:
        p.error("--output-len must be >= 2 (decode needs at least one step after prefill)")
    return args


def random_prompts(bs: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed * 1_000_003 + bs * 1009 + input_len)
    hi = min(vocab, 10_000) - 1  # nano-vllm draws ids below 10000
    return [[rng.randint(3, hi) for _ in range(input_len)] for _ in range(bs)]


# ---- ours ------------------------------------------------------------------------------------
def make_engine(model: BenchModel, args: argparse.Namespace, max_tokens: int, max_prompt_tokens: int,
                max_bs: int) -> Any:
    import sglang

    chunk = max(min(max_prompt_tokens, args.max_prefill_tokens), 1)
    kw = engine_kwargs(args, model)
    kw["overlap_schedule"] = args.overlap_schedule
    if args.device == "cpu":
        kw["max_total_tokens"] = max_tokens + 64 * max_bs + 1024
    return sglang.Engine(
        model.path,
        skip_tokenizer_init=True,
        chunked_prefill_size=chunk,
        max_prefill_tokens=chunk,
        max_running_requests=max(max_bs, 1),
        **kw,
    )


def _requests(engine: Any, prompts: list[list[int]], output_len: int, temperature: float = 0.0) -> list[Any]:
    params = [{"max_new_tokens": output_len, "temperature": temperature, "ignore_eos": True} for _ in prompts]
    reqs, _ = engine._make_requests(None, prompts, params, False, None, 0, False)
    return list(reqs)


def run_ours(engine: Any, prompts: list[list[int]], output_len: int, device: str,
             temperature: float = 0.0) -> tuple[float, int, list[float]]:
    """Prefill seconds, prefill steps, and the list of decode-step seconds, measured on the
    scheduler thread (synchronized with the GPU around every timed region)."""
    reqs = _requests(engine, prompts, output_len, temperature)

    def body(s: Any) -> tuple[float, int, list[float]]:
        if s.has_work():
            raise RuntimeError("the scheduler is busy; the benchmark needs it to itself")
        for r in reqs:
            s.add_request(r)
        sync(device)
        t0 = time.perf_counter()
        prefill_steps = 0
        # With overlap scheduling the last prefill step's tokens are still in flight: read them.
        while any(r.num_computed < len(r.prompt_ids) for r in reqs) and prefill_steps <= len(reqs) * len(prompts[0]):
            s.step()
            prefill_steps += 1
        s.drain()
        sync(device)
        prefill = time.perf_counter() - t0
        bad = [r for r in reqs if r.num_computed != len(r.prompt_ids) or len(r.output_ids) != 1]
        if bad:
            raise RuntimeError(
                f"prefill did not finish cleanly ({len(bad)} of {len(reqs)} requests not prefilled "
                f"after {prefill_steps} steps); raise the KV pool (--mem-fraction-static)"
            )
        # Decode is timed as a whole (no sync between steps, which would defeat overlap scheduling):
        # each step's time is the phase's time over its forwards.
        first_fwd = s.num_steps
        t0 = time.perf_counter()
        while s.has_work():
            s.step()
        sync(device)
        total = time.perf_counter() - t0
        forwards = s.num_steps - first_fwd
        if forwards != output_len - 1 or any(len(r.output_ids) != output_len for r in reqs):
            raise RuntimeError(f"expected {output_len - 1} decode steps of batch {len(reqs)}, ran {forwards}")
        return prefill, prefill_steps, [total / forwards] * forwards

    result: tuple[float, int, list[float]] = engine._loop.call(body, timeout=None)
    return result


# ---- HF --------------------------------------------------------------------------------------
def run_hf(model: Any, prompts: list[list[int]], output_len: int, temperature: float = 0.0) -> tuple[float, float]:
    """HF prefill seconds and decode seconds per step."""
    device = str(model.device)
    ids = torch.tensor(prompts, dtype=torch.int64, device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    kw: dict[str, Any] = {
        "attention_mask": torch.ones_like(ids),
        **sampling,
        "use_cache": True,
        "pad_token_id": model.generation_config.pad_token_id or 0,
    }
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out1 = model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync(device)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        sync(device)
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


def gpu_kernel_table(prof: Any, steps: int, wall: float, limit: int) -> str:
    """Kernels by GPU time per step (graph replays included), and GPU busy time against the wall
    time of the same steps: the difference is launch gaps and host work the GPU waited for."""
    from torch.autograd import DeviceType

    rows = []
    busy = 0.0
    for e in prof.key_averages():
        t = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        if t <= 0 or e.device_type != DeviceType.CUDA:  # kernels and copies only, not the ops above them
            continue
        busy += t
        rows.append([f"`{e.key[:90]}`", t / steps, e.count / steps, t])
    rows.sort(key=lambda r: -r[3])
    busy_ms = busy / steps / 1e3
    wall_ms = wall / steps * 1e3
    head = (f"GPU busy {busy_ms:.3f} ms/step of {wall_ms:.3f} ms/step wall ({busy_ms / wall_ms:.1%}); "
            f"kernel launches {sum(r[2] for r in rows):.0f}/step")
    table = markdown_table(["kernel", "us/step", "calls/step", "% of busy"],
                           [[r[0], r[1], r[2], 100 * r[3] / (busy or 1)] for r in rows[:limit]])
    return head + "\n\n" + table


def gpu_gap_table(prof: Any, steps: int, limit: int = 8, min_us: float = 5.0) -> str:
    """Where the GPU sits idle: gaps of at least ``min_us`` between one kernel (or copy) ending and
    the next starting, summed per (before, after) pair, from the profiler's trace."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as fh:
            trace = json.load(fh)
    evs = sorted(
        (e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: float(e["ts"]),
    )
    pairs: dict[tuple[str, str], list[float]] = {}
    total = 0.0
    end = None
    prev = ""
    for e in evs:
        ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
        name = str(e.get("name", "?"))[:48]
        if end is not None and ts - end >= min_us:
            gap = ts - end
            total += gap
            acc = pairs.setdefault((prev, name), [0.0, 0])
            acc[0] += gap
            acc[1] += 1
        if end is None or ts + dur > end:
            end, prev = ts + dur, name
    rows = sorted(([f"`{a}`", f"`{b}`", v[0] / steps, v[1] / steps] for (a, b), v in pairs.items()), key=lambda r: -r[2])
    head = f"GPU idle in gaps >= {min_us:g} us: {total / steps:.0f} us/step"
    return head + "\n\n" + markdown_table(["after", "before", "idle us/step", "gaps/step"], rows[:limit])


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


def profile_point(engine: Any, prompts: list[list[int]], steps: int, temperature: float = 0.0,
                  gap_min_us: float = 5.0) -> str:
    """Prefill and decode of one batch: phase breakdown, torch.profiler's top operators and
    cProfile's top Python functions. Returns a Markdown report."""
    from torch.profiler import ProfilerActivity, profile

    out_len = 3 * steps + 8
    reqs = _requests(engine, prompts, out_len, temperature)
    bs, in_len = len(prompts), len(prompts[0])

    def body(s: Any) -> str:
        for r in reqs:
            s.add_request(r)
        lines = [f"### Profile: batch {bs}, input {in_len}", ""]
        on_gpu = torch.cuda.is_available() and s.runner.device.type == "cuda"
        acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof, phase_timers(s) as timer:
            t0 = time.perf_counter()
            s.step()  # prefill
            if on_gpu:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        lines += ["Prefill step, phases (the profiler runs too, so times are inflated a little):", ""]
        lines += [_phase_table(timer, wall, 1), "", "Prefill step, top operators (torch.profiler):", ""]
        lines += [op_table(prof, 12), ""]
        if on_gpu:
            lines += ["Prefill step on the GPU (torch.profiler, CUDA kernels):", "",
                      gpu_kernel_table(prof, 1, wall, 25), "", gpu_gap_table(prof, 1, min_us=gap_min_us), ""]

        while any(r.num_computed < len(r.prompt_ids) for r in reqs):  # the rest of a prefill split into chunks
            s.step()
        s.drain()
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

        if on_gpu:
            torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    s.step()
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            lines += [f"Decode on the GPU over {steps} steps (torch.profiler, CUDA kernels):", "",
                      gpu_kernel_table(prof, steps, wall, 30), "",
                      gpu_gap_table(prof, steps, limit=16, min_us=gap_min_us), ""]

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

    # FLOP units: TFLOP on a GPU, GFLOP on a CPU.
    unit, prefix = (1e12, "T") if hw.on_gpu else (1e9, "G")
    vs_hf = []
    vs_hw = []
    for p in points:
        row = [
            p.bs, p.input_len, p.output_len,
            ms(p.ours_prefill_s), ms(p.hf_prefill_s), p.hf_prefill_s / p.ours_prefill_s,
            ms(p.ours_decode_s), ms(p.hf_decode_s), p.hf_decode_s / p.ours_decode_s,
            p.bs / p.ours_decode_s,
        ]
        vs_hf.append(row if hw.on_gpu else [*row, p.others_cores])
        ctx = p.input_len + p.output_len // 2  # mean context over the decode steps
        step_bytes = cost.decode_bytes(p.bs, ctx)
        floor_s = step_bytes / (hw.bandwidth_gbs * 1e9)
        prefill_flops = p.bs * cost.forward_flops(p.input_len, p.input_len, 1)
        vs_hw.append([
            p.bs, p.input_len, p.output_len,
            step_bytes / 1e6, ms(floor_s), p.ours_decode_s / floor_s, step_bytes / p.ours_decode_s / 1e9,
            p.prefill_steps, prefill_flops / unit, prefill_flops / p.ours_prefill_s / unit,
            prefill_flops / p.ours_prefill_s / 1e9 / hw.matmul_gflops,
        ])
    t1 = markdown_table(
        ["bs", "in", "out", "ours prefill ms", "HF prefill ms", "prefill HF/ours",
         "ours decode ms/step", "HF decode ms/step", "decode HF/ours", "ours decode tok/s"]
        + ([] if hw.on_gpu else ["others' load (cores)"]),
        vs_hf,
    )
    t2 = markdown_table(
        ["bs", "in", "out", "MB read/step", "floor ms/step", "ours/floor", "ours decode GB/s",
         "prefill steps", f"prefill {prefix}FLOP", f"ours prefill {prefix}FLOP/s", "prefill / matmul rate"],
        vs_hw,
    )
    return (
        "Ours against HF transformers `generate` (HF/ours > 1: we are faster):\n\n" + t1
        + f"\n\nAgainst the hardware ({hw.roof_line()}; a decode step must read every weight once "
        "plus the KV cache at the mean decode context, floor = bytes / bandwidth; ours/floor is the "
        "decode roofline ratio, 1.0 is the limit):\n\n" + t2
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype, model, _, cost = prepare_model(args)
    hw = hardware_info(dtype, args.wait_quiet, args.device)
    header = [
        f"model: {model.name} ({cost.num_params / 1e6:.1f}M params, {args.dtype}, {cost.num_layers} layers, "
        f"hidden {cost.hidden}, vocab {cost.vocab}) at {model.path}",
        f"hardware: {hw.line()}",
        f"{hw.roof_line()}; sglang at {hw.commit}; {engine_label(args)}",
    ]
    print("\n".join(header), flush=True)

    grid = [(b, i, o) for b in args.batch_size for i in args.input_len for o in args.output_len]
    max_bs = max(args.batch_size)
    max_tokens = max(b * (i + o) for b, i, o in grid)
    max_prompt = max(b * i for b, i, _ in grid)
    engine = make_engine(model, args, max_tokens, max_prompt, max_bs)

    # Warm-up: first calls pay for allocator growth, kernel selection and Triton compilation:
    # a decode of the largest batch, then one full prefill chunk of the longest prompts.
    run_ours(engine, random_prompts(max_bs, 16, cost.vocab, args.seed + 1), 4, args.device)
    in_max = max(args.input_len)
    n_fill = max(1, min(max_bs, min(max_prompt, args.max_prefill_tokens) // in_max))
    run_ours(engine, random_prompts(n_fill, in_max, cost.vocab, args.seed + 2), 2, args.device)
    engine.flush_cache()

    points: list[Point] = []
    for bs, in_len, out_len in grid:
        pt = Point(bs, in_len, out_len)
        prompts = random_prompts(bs, in_len, cost.vocab, args.seed)
        prefills, prefill_steps, decodes = [], [], []
        wait_for_quiet(args.wait_quiet)
        meter = LoadMeter()
        for _ in range(args.repeats):
            pre, n_pre, steps = run_ours(engine, prompts, out_len, args.device, args.temperature)
            engine.flush_cache()  # the next repeat computes its prompts again
            prefills.append(pre)
            prefill_steps.append(n_pre)
            decodes.append(statistics.median(steps))
        pt.ours_prefill_s, pt.ours_decode_s = min(prefills), statistics.median(decodes)
        pt.prefill_steps = max(prefill_steps)
        pt.others_cores = meter.others_cores()
        points.append(pt)
        print(
            f"bs={bs} in={in_len} out={out_len}: ours prefill {pt.ours_prefill_s * 1e3:.1f} ms "
            f"({pt.prefill_steps} step{'s' if pt.prefill_steps != 1 else ''}), decode "
            f"{pt.ours_decode_s * 1e3:.2f} ms/step; other processes used {pt.others_cores:.2f} cores",
            flush=True,
        )

    prof = ""
    if args.profile:
        bs, in_len, _ = grid[-1]
        prof = profile_point(engine, random_prompts(bs, in_len, cost.vocab, args.seed), args.profile_steps,
                             args.temperature, args.gap_min_us)
    # HF runs after our engine is gone: on a GPU both would not fit next to each other.
    free_engine(engine)
    del engine
    release_memory()
    if not args.skip_hf:
        run_hf_points(model, dtype, args, points)

    report = tables(points, cost, hw)
    print("\n" + report, flush=True)
    body = "\n".join(f"- {h}" for h in header) + "\n\n" + report
    if prof:
        print("\n" + prof, flush=True)
        body += "\n\n" + prof
    if args.out:
        append_section(args.out, f"one_batch: {model.name}, {args.dtype}, {args.device}", body)
        print(f"\nappended to {args.out}")


def run_hf_points(model: BenchModel, dtype: torch.dtype, args: argparse.Namespace, points: list[Point]) -> None:
    """HF prefill and decode for every point with a batch up to ``--hf-max-batch`` (filled in place)."""
    todo = [p for p in points if args.hf_max_batch is None or p.bs <= args.hf_max_batch]
    if not todo:
        return
    hf = load_hf_baseline(model, dtype, args.device)
    vocab = int(hf.config.vocab_size)
    run_hf(hf, random_prompts(min(p.bs for p in todo), 16, vocab, args.seed + 1), 4)  # warm-up
    for pt in todo:
        prompts = random_prompts(pt.bs, pt.input_len, vocab, args.seed)
        n = args.hf_output_len or pt.output_len
        hf_pre, hf_dec = [], []
        for _ in range(args.repeats):
            hp, hd = run_hf(hf, prompts, n, args.temperature)
            hf_pre.append(hp)
            hf_dec.append(hd)
        pt.hf_prefill_s, pt.hf_decode_s = min(hf_pre), statistics.median(hf_dec)
        print(
            f"bs={pt.bs} in={pt.input_len} out={n}: HF prefill {pt.hf_prefill_s * 1e3:.1f} ms, "
            f"decode {pt.hf_decode_s * 1e3:.2f} ms/step",
            flush=True,
        )
    del hf


if __name__ == "__main__":
    main()
