"""Shared-prefix workload (SGLang's ``generated-shared-prefix`` shape), prefix cache on vs off.

``--num-groups`` groups, each with one system prompt of ``--system-prompt-len`` random tokens
shared by ``--prompts-per-group`` questions of ``--question-len`` tokens; every request generates
``--output-len`` tokens (ignore_eos). All requests are submitted at once; the same workload runs
with the radix cache on and off in the same process (one engine after the other; the first is shut
down and its GPU memory freed before the second starts) and the speed-up is printed.

    .venv/bin/python benchmarks/shared_prefix.py --tiny
    .venv/bin/python benchmarks/shared_prefix.py --num-groups 4 --prompts-per-group 8 --system-prompt-len 512
    python benchmarks/shared_prefix.py --device cuda --model-shape llama3-8b --max-running-requests 64

``--device`` defaults to ``auto`` here (cuda when available). In float32 the greedy outputs of the
two runs must be identical (the script fails otherwise); in bf16/fp16 the two runs batch different
kernels (prefix hits vs full prompts), so near-ties may flip: the count of identical outputs is
printed and not enforced.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from sglang.engine.engine import Engine  # noqa: E402


def workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    hi = min(vocab, 30000) - 1
    prompts = []
    for _ in range(args.num_groups):
        system = [rng.randint(3, hi) for _ in range(args.system_prompt_len)]
        for _ in range(args.prompts_per_group):
            prompts.append(system + [rng.randint(3, hi) for _ in range(args.question_len)])
    rng.shuffle(prompts)  # groups arrive interleaved, as in SGLang's bench
    return prompts


def run(model: common.BenchModel, prompts: list[list[int]], args: argparse.Namespace, cache_on: bool) -> dict[str, Any]:
    eng = Engine(
        model_path=model.path, skip_tokenizer_init=True, **common.engine_kwargs(args, model),
        disable_radix_cache=not cache_on, page_size=args.page_size, schedule_policy=args.schedule_policy,
        chunked_prefill_size=args.chunked_prefill_size, max_running_requests=args.max_running_requests,
    )
    params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    # Warm-up outside the timing (allocator, kernels), then flush so both runs start cold.
    eng.generate(input_ids=[[5, 6, 7]], sampling_params={**params, "max_new_tokens": 2})
    eng.flush_cache()
    common.sync(args.device)
    t0 = time.perf_counter()
    outs = eng.generate(input_ids=prompts, sampling_params=params)
    common.sync(args.device)
    dt = time.perf_counter() - t0
    assert isinstance(outs, list)
    stats = eng.get_stats()
    eng.check_integrity()
    common.free_engine(eng)
    del eng
    common.release_memory()
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
    return {
        "seconds": dt, "out_tps": out_tokens / dt, "total_tps": (in_tokens + out_tokens) / dt,
        "cached_frac": cached / in_tokens, "outputs": [o["output_ids"] for o in outs], "steps": stats["num_steps"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-groups", type=int, default=4)
    ap.add_argument("--prompts-per-group", type=int, default=16)
    ap.add_argument("--system-prompt-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    common.add_model_args(ap, default_device="auto")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--schedule-policy", default="lpm", choices=["fcfs", "lpm"])
    ap.add_argument("--chunked-prefill-size", type=int, default=4096)
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--out", default=None, help="append a Markdown section to this file")
    args = ap.parse_args()
    common.finish_model_args(ap, args)
    common.quiet_logs()
    model = common.resolve_bench_model(args)
    name = model.name
    vocab = common.load_hf_config(model.path).vocab_size
    prompts = workload(args, vocab)
    hw = common.hardware_info(common.torch_dtype(args.dtype), device=args.device)
    off = run(model, prompts, args, cache_on=False)
    on = run(model, prompts, args, cache_on=True)
    n_same = sum(a == b for a, b in zip(on["outputs"], off["outputs"], strict=True))
    same = n_same == len(prompts)
    rows = [
        ["off", off["seconds"], off["out_tps"], off["total_tps"], off["cached_frac"], off["steps"]],
        ["on", on["seconds"], on["out_tps"], on["total_tps"], on["cached_frac"], on["steps"]],
    ]
    table = common.markdown_table(["radix cache", "time s", "output tok/s", "total tok/s", "prompt cached", "steps"], rows)
    shape = (
        f"{args.num_groups} groups x {args.prompts_per_group} prompts, system {args.system_prompt_len}, "
        f"question {args.question_len}, output {args.output_len}, page {args.page_size}, {args.schedule_policy}"
    )
    body = (
        f"model: {name}, {args.dtype}; {shape}\n\nhardware: {hw.line()}; sglang at {hw.commit}\n\n"
        f"{hw.roof_line()}; {common.engine_label(args)}\n\n"
        f"{table}\n\n"
        f"speed-up (cache on / off): **{off['seconds'] / on['seconds']:.2f}x**; "
        f"greedy outputs identical: {same} ({n_same} of {len(prompts)})\n"
    )
    print(body)
    if args.out:
        common.append_section(args.out, f"shared prefix: {name}, {args.device}", body)
    if not same and args.dtype == "float32":
        sys.exit("outputs differ between cache on and off")


if __name__ == "__main__":
    main()
