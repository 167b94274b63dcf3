"""JSON-schema decoding throughput against unconstrained decoding, same model, batch and lengths.

    .venv/bin/python benchmarks/structured.py                        # SmolLM2-135M-Instruct on CPU
    .venv/bin/python benchmarks/structured.py --device cuda --batch 64
    .venv/bin/python benchmarks/structured.py --out benchmarks/results/2026-11-22-structured-cpu.md

Workload: ``--batch`` chat prompts asking for a person record, one ``generate`` call each round.
The constrained run uses ``json_schema`` (enums, bounded integers, patterned strings, a bounded
array); it ends when each grammar ends. The unconstrained run then asks for exactly as many tokens
per request as the constrained run of the same round produced (``max_new_tokens`` = that count, ``ignore_eos``), so
both runs decode the same number of tokens at the same batch shape and the ratio isolates the
grammar's cost: the compile cache lookup, the bitmask fill (CPU) and apply, and the matcher
updates. Rounds alternate the two modes; each mode reports its median tok/s. The first constrained call
(warm-up, not timed) builds the tokenizer info and compiles the schema; the compile times are
printed on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    LoadMeter,
    append_section,
    hardware_info,
    markdown_table,
    quiet_logs,
    resolve_model,
    torch_dtype,
    wait_for_quiet,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "[A-Z][a-z]{1,11}( [A-Z][a-z]{1,11})?"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "[a-z]{1,12}@[a-z]{1,10}\\.(com|org|net)"},
        "city": {"enum": ["Paris", "London", "Tokyo", "New York", "Berlin", "Madrid"]},
        "skills": {"type": "array", "items": {"enum": ["python", "rust", "sql", "go", "c++"]}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "city", "skills", "active"],
    "additionalProperties": False,
}


def prompts(engine: Any, n: int) -> list[list[int]]:
    tok = engine.tokenizer
    if tok is None:
        raise SystemExit("this benchmark needs a model folder with a tokenizer")
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Invent person number {i} and give it as a JSON record "
                "with name, age, email, city, skills and active."}]
        out.append(tok.encode_chat(msg) if tok.chat_template else tok.encode(msg[0]["content"]))
    return out


def timed(engine: Any, ids: list[list[int]], params: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=ids, sampling_params=params)
    return time.perf_counter() - t0, outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="HF folder with a tokenizer; default: SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights from config.json (the folder still needs a tokenizer)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=160, help="cap of the constrained run")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S", help="wait up to S s for an idle machine")
    p.add_argument("--out", default=None, help="append a Markdown section to this file")
    args = p.parse_args()
    quiet_logs()
    from sglang.engine.engine import Engine

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    path, name = resolve_model(args.model_path, tiny=False)
    hw = hardware_info(torch_dtype(dtype), wait_quiet_s=args.wait_quiet) if args.device == "cpu" else None
    engine = Engine(model_path=path, device=args.device, dtype=dtype, load_format=args.load_format,
                    max_running_requests=max(args.batch, 1))
    try:
        ids = prompts(engine, args.batch)
        spec = json.dumps(SCHEMA)
        t0 = time.perf_counter()
        engine.grammars.get("json_schema", spec)  # tokenizer info + first compile
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.grammars.get("json_schema", json.dumps({**SCHEMA, "title": "another key"}))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.grammars.get("json_schema", spec)
        hit_s = time.perf_counter() - t0

        base = {"temperature": args.temperature, "seed": 0}
        grammar = [{**base, "json_schema": spec, "max_new_tokens": args.max_new_tokens} for _ in ids]
        _, warm = timed(engine, ids, grammar)  # warm-up; also fixes the lengths
        lengths = [o["meta_info"]["completion_tokens"] for o in warm]
        free = [{**base, "max_new_tokens": n, "ignore_eos": True} for n in lengths]
        timed(engine, ids, free)
        valid = sum(_valid(o["text"]) for o in warm)
        stops = sum(o["meta_info"]["finish_reason"]["type"] == "stop" for o in warm)

        # Per round and mode: (seconds, output tokens). Greedy bf16 on a GPU is not bit-stable
        # across runs, so each round's unconstrained run takes that round's constrained lengths.
        runs: dict[str, list[tuple[float, int]]] = {"json_schema": [], "unconstrained": []}
        meter = LoadMeter()
        for _ in range(args.rounds):
            wait_for_quiet(args.wait_quiet)
            dt, outs = timed(engine, ids, grammar)
            got = [o["meta_info"]["completion_tokens"] for o in outs]
            runs["json_schema"].append((dt, sum(got)))
            dt, _ = timed(engine, ids, [{**base, "max_new_tokens": n, "ignore_eos": True} for n in got])
            runs["unconstrained"].append((dt, sum(got)))
        others = meter.others_cores()
    finally:
        engine.shutdown()

    tokens = sum(lengths)
    tps = {m: statistics.median(n / dt for dt, n in rs) for m, rs in runs.items()}
    ratio = tps["json_schema"] / tps["unconstrained"]
    rows = [
        [m, args.batch, statistics.median(n for _, n in rs), statistics.median(dt for dt, _ in rs),
         min(dt for dt, _ in rs), tps[m]]
        for m, rs in runs.items()
    ]
    table = markdown_table(["mode", "batch", "output tokens", "median s", "best s", "tok/s (median)"], rows)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (hw.line() if hw else "cpu")
    lines = [
        f"model: {name} ({dtype}, {args.device}); device: {device}",
        hw.roof_line() if hw else "",
        f"schema outputs: {valid}/{len(warm)} parse as JSON and validate, {stops}/{len(warm)} ended with stop; "
        f"{tokens / len(lengths):.1f} tokens per request (min {min(lengths)}, max {max(lengths)})",
        f"grammar: first request {cold * 1e3:.0f} ms (tokenizer info + compile), another schema "
        f"{compile_s * 1e3:.1f} ms, cache hit {hit_s * 1e6:.0f} us",
        f"other processes used {others:.2f} cores on average during the timed rounds "
        f"(load average {os.getloadavg()[0]:.2f})",
        "",
        table,
        "",
        f"**json_schema / unconstrained throughput: {ratio:.3f}** (median of {args.rounds} rounds each)",
    ]
    body = "\n".join(x for x in lines if x is not None)
    print(body)
    if args.out:
        append_section(args.out, f"Structured output: {name}, batch {args.batch}, {args.device}", body)


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


if __name__ == "__main__":
    main()
