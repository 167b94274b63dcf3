"""Online serving benchmark, like SGLang's ``bench_serving``: drive a running router (or a worker's
gRPC directly) with a dataset at a request rate, streaming, and report TTFT, ITL, TPOT and E2E
latency percentiles, request and token throughput and the prefix-cache hit rate.

Targets (one per run):
  --base-url URL          a running router (``sglang up``); ``--backend sglang`` streams the native
                          ``/generate``, ``--backend openai`` streams ``/v1/completions``
  --launch                start ``sglang up`` itself (``--workers``, ``--policy``, model flags), run,
                          stop it; ``--compare-direct`` then runs the same workload straight at
                          worker-0's gRPC too and prints the router's overhead
  --direct-worker ADDR    a worker's gRPC (host:port) through ``sglang.transport.WorkerClient``

Datasets (token ids drawn from the model's vocabulary, special tokens excluded, seeded):
  random                   --random-input-len/--random-output-len, lengths uniform in
                           [len * range_ratio, len] (range ratio 1: fixed lengths)
  generated-shared-prefix  --gsp-num-groups groups, each a system prompt of --gsp-system-prompt-len
                           tokens shared by --gsp-prompts-per-group questions of --gsp-question-len
                           tokens; prompts are shuffled so families interleave

Prompts are sent as ``input_ids`` to the native API and the worker (exact lengths; the router then
tokenizes nothing), as text to ``/v1/completions``. Every request uses ``ignore_eos`` and greedy
sampling so the output length is exactly what was asked. Cache hit rate = sum(cached_tokens) /
sum(prompt_tokens) from ``meta_info`` (native, worker) or ``usage.prompt_tokens_details``.

Launching, CPU accounting on the shared machine and the router's routing counters live in
``serving_stack.py``.

    .venv/bin/python benchmarks/serving.py --launch --tiny --workers 2 --policy cache_aware \\
        --dataset-name generated-shared-prefix --request-rate 8 --output-file out.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serving_stack  # noqa: E402

# ---- datasets -----------------------------------------------------------------------------------


@dataclass
class Request:
    input_ids: list[int]
    output_len: int
    text: str = ""  # for the OpenAI completions backend
    group: int = -1


def token_pool(tokenizer: Any) -> np.ndarray:
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)


def random_dataset(args: argparse.Namespace, pool: np.ndarray, rng: np.random.Generator) -> list[Request]:
    def lens(n: int) -> np.ndarray:
        lo = max(1, int(n * args.random_range_ratio))
        return rng.integers(lo, n + 1, size=args.num_prompts)

    ins, outs = lens(args.random_input_len), lens(args.random_output_len)
    return [Request(rng.choice(pool, size=int(i)).tolist(), int(o)) for i, o in zip(ins, outs, strict=True)]


def shared_prefix_dataset(
    args: argparse.Namespace, pool: np.ndarray, rng: np.random.Generator
) -> list[Request]:
    reqs = []
    for g in range(args.gsp_num_groups):
        system = rng.choice(pool, size=args.gsp_system_prompt_len).tolist()
        for _ in range(args.gsp_prompts_per_group):
            question = rng.choice(pool, size=args.gsp_question_len).tolist()
            reqs.append(Request(system + question, args.gsp_output_len, group=g))
    order = rng.permutation(len(reqs))
    return [reqs[i] for i in order]


def build_dataset(args: argparse.Namespace, tokenizer: Any) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    pool = token_pool(tokenizer)
    if args.dataset_name == "random":
        reqs = random_dataset(args, pool, rng)
    else:
        reqs = shared_prefix_dataset(args, pool, rng)
    if args.backend == "openai":
        for r in reqs:
            r.text = tokenizer.decode(r.input_ids)
    return reqs


# ---- one request, three ways --------------------------------------------------------------------


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


class Timer:
    """Turns (arrival time, tokens so far) into TTFT and per-token ITL, spreading a chunk of k
    tokens evenly over the gap before it (as SGLang's bench_serving does)."""

    def __init__(self, result: Result) -> None:
        self.result = result
        self.start = time.perf_counter()
        self.last = self.start
        self.tokens = 0

    def tokens_now(self, total: int) -> None:
        now = time.perf_counter()
        new = total - self.tokens
        if new <= 0:
            return
        if self.tokens == 0:
            self.result.ttft = now - self.start
            new -= 1
        if new > 0:
            self.result.itl.extend([(now - self.last) / new] * new)
        self.tokens, self.last = total, now

    def done(self) -> None:
        self.result.latency = time.perf_counter() - self.start


async def sse_events(resp: Any) -> AsyncIterator[dict[str, Any]]:
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def sampling(req: Request) -> dict[str, Any]:
    return {"max_new_tokens": req.output_len, "ignore_eos": True, "temperature": 0.0}


async def send_native(session: Any, base: str, req: Request, headers: dict[str, str]) -> Result:
    res = Result(prompt_len=len(req.input_ids))
    body = {"input_ids": req.input_ids, "sampling_params": sampling(req), "stream": True}
    timer = Timer(res)
    async with session.post(f"{base}/generate", json=body, headers=headers) as resp:
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            return res
        meta: dict[str, Any] = {}
        async for ev in sse_events(resp):
            if "error" in ev:
                res.error = str(ev["error"])[:200]
                return res
            meta = ev.get("meta_info", {})
            timer.tokens_now(int(meta.get("completion_tokens", timer.tokens + 1)))
    timer.done()
    res.output_len = int(meta.get("completion_tokens", timer.tokens))
    res.prompt_len = int(meta.get("prompt_tokens", res.prompt_len))
    res.cached_tokens = int(meta.get("cached_tokens", 0))
    res.ok = res.output_len > 0
    return res


async def send_openai(session: Any, base: str, model: str, req: Request, headers: dict[str, str]) -> Result:
    res = Result()
    body = {
        "model": model,
        "prompt": req.text,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    timer = Timer(res)
    chunks = 0
    usage: dict[str, Any] = {}
    async with session.post(f"{base}/v1/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            return res
        async for ev in sse_events(resp):
            if ev.get("usage"):
                usage = ev["usage"]
            if ev.get("choices") and ev["choices"][0].get("text"):
                chunks += 1
                timer.tokens_now(chunks)
    timer.done()
    res.output_len = int(usage.get("completion_tokens", chunks))
    res.prompt_len = int(usage.get("prompt_tokens", 0))
    res.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0)
    res.ok = res.output_len > 0
    return res


async def send_worker(client: Any, req: Request) -> Result:
    from sglang.transport.types import GenerateInput

    res = Result(prompt_len=len(req.input_ids))
    inp = GenerateInput(request_id=uuid.uuid4().hex, input_ids=req.input_ids, sampling_params=sampling(req))
    timer = Timer(res)
    async with contextlib.aclosing(client.generate(inp)) as events:
        async for ev in events:
            if ev.kind == "chunk":
                timer.tokens_now(timer.tokens + len(ev.token_ids))
            elif ev.kind == "complete":
                timer.tokens_now(timer.tokens + len(ev.token_ids))
                res.output_len = ev.completion_tokens or timer.tokens
                res.prompt_len = ev.prompt_tokens or res.prompt_len
                res.cached_tokens = ev.cached_tokens
            else:
                res.error = f"{ev.error_code} {ev.error_message}"[:200]
                return res
    timer.done()
    res.ok = res.output_len > 0
    return res


# ---- the run ------------------------------------------------------------------------------------


async def run_workload(
    args: argparse.Namespace, reqs: list[Request], target: dict[str, Any]
) -> dict[str, Any]:
    """Send ``reqs`` at ``--request-rate`` (Poisson; inf: all at once) under ``--max-concurrency``."""
    import aiohttp

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    client = None
    if target["kind"] == "worker":
        from sglang.transport.worker_client import WorkerClient

        client = WorkerClient(target["addr"])

    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(req: Request) -> Result:
            async with gate:
                try:
                    if target["kind"] == "worker":
                        return await send_worker(client, req)
                    if args.backend == "openai":
                        return await send_openai(session, target["url"], target["model"], req, headers)
                    return await send_native(session, target["url"], req, headers)
                except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
                    return Result(error=f"{type(e).__name__}: {e}"[:200])

        warm = [one(Request(r.input_ids[:8], 2)) for r in reqs[: args.warmup_requests]]
        await asyncio.gather(*warm)
        if target["kind"] == "worker":
            assert client is not None
            await client.flush_cache()
        elif target.get("flush"):
            await target["flush"]()

        rng = random.Random(args.seed)
        tasks = []
        meter = serving_stack.CpuMeter(target.get("pids", lambda: [])())
        t0 = time.perf_counter()
        for r in reqs:
            tasks.append(asyncio.ensure_future(one(r)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        cpu = meter.stop()
    if client is not None:
        await client.close()
    return {**summarize(results, duration), **cpu}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def summarize(results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    e2e = [r.latency for r in ok]
    prompt = sum(r.prompt_len for r in ok)
    output = sum(r.output_len for r in ok)
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(errors),
        "errors": errors[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "input_throughput": prompt / duration,
        "output_throughput": output / duration,
        "total_throughput": (prompt + output) / duration,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
    }
    for name, values in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
        out[f"mean_{name}_ms"] = float(np.mean(values)) * 1000 if values else float("nan")
        out[f"p50_{name}_ms"] = pct(values, 50)
        out[f"p99_{name}_ms"] = pct(values, 99)
    return out


# ---- reporting ----------------------------------------------------------------------------------

ROW_KEYS = [
    ("completed", "ok"),
    ("request_throughput", "req/s"),
    ("output_throughput", "out tok/s"),
    ("total_throughput", "total tok/s"),
    ("cache_hit_rate", "cache hit"),
    ("p50_ttft_ms", "TTFT p50 ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("p50_itl_ms", "ITL p50 ms"),
    ("p99_itl_ms", "ITL p99 ms"),
    ("p50_tpot_ms", "TPOT p50 ms"),
    ("p50_e2e_ms", "E2E p50 ms"),
    ("p99_e2e_ms", "E2E p99 ms"),
    ("client_cores", "client cores"),
    ("stack_cores", "stack cores"),
    ("others_cores", "others cores"),
]


def table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    headers = ["run"] + [h for _, h in ROW_KEYS]
    rows = [[name] + [s[k] for k, _ in ROW_KEYS] for name, s in runs]
    return common.markdown_table(headers, rows)


OTHERS_LOAD = [float("nan")]  # cores other processes used just before the run (the machine is shared)


def hardware_line() -> str:
    return (
        f"{common.cpu_model()}, {common.usable_cores()} cores, commit {common.git_commit()}; "
        f"other processes used {OTHERS_LOAD[0]:.2f} cores before the run"
    )


def write_output(
    path: str, args: argparse.Namespace, runs: list[tuple[str, dict[str, Any]]], extra: str
) -> None:
    if path.endswith(".jsonl"):
        with open(path, "a", encoding="utf-8") as f:
            for name, s in runs:
                record = {
                    "run": name,
                    "args": vars(args),
                    "command": common.command_line(),
                    "hardware": hardware_line(),
                }
                f.write(json.dumps({**record, **s}) + "\n")
        return
    title = f"serving: {args.dataset_name}, {args.num_prompts_effective} requests, rate {args.request_rate}"
    head = f"{hardware_line()}; max concurrency {args.max_concurrency}\n\n"
    common.append_section(path, title, head + table(runs) + ("\n\n" + extra if extra else ""))


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:30000", help="a running router")
    target.add_argument("--launch", action="store_true", help="start `sglang up` for the run, stop it after")
    target.add_argument(
        "--direct-worker", metavar="ADDR", help="drive this worker's gRPC (host:port) instead"
    )
    target.add_argument(
        "--compare-direct", action="store_true", help="with --launch: also run at worker-0 directly"
    )
    target.add_argument(
        "--backend",
        choices=["sglang", "openai"],
        default="sglang",
        help="native /generate or /v1/completions",
    )
    target.add_argument(
        "--model", default=None, help="model name for the OpenAI API (default: the router's first)"
    )
    target.add_argument("--api-key", default=None)
    model = ap.add_argument_group("model (tokenizer for the prompts; what --launch serves)")
    model.add_argument("--model-path", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    model.add_argument("--tiny", action="store_true", help="a tiny random Llama with SmolLM2's tokenizer")
    model.add_argument("--workers", type=int, default=1)
    model.add_argument(
        "--policy", default="cache_aware", choices=["cache_aware", "round_robin", "power_of_two"]
    )
    model.add_argument("--port", type=int, default=0, help="router port for --launch (0: a free one)")
    model.add_argument("--dtype", default="float32")
    model.add_argument("--load-format", default=None)
    model.add_argument("--page-size", type=int, default=None)
    model.add_argument("--max-total-tokens", type=int, default=None)
    model.add_argument("--launch-timeout", type=float, default=600)
    data = ap.add_argument_group("workload")
    data.add_argument("--dataset-name", choices=["random", "generated-shared-prefix"], default="random")
    data.add_argument("--num-prompts", type=int, default=100, help="random dataset size")
    data.add_argument("--random-input-len", type=int, default=256)
    data.add_argument("--random-output-len", type=int, default=32)
    data.add_argument("--random-range-ratio", type=float, default=1.0)
    data.add_argument("--gsp-num-groups", type=int, default=4)
    data.add_argument("--gsp-prompts-per-group", type=int, default=16)
    data.add_argument("--gsp-system-prompt-len", type=int, default=512)
    data.add_argument("--gsp-question-len", type=int, default=32)
    data.add_argument("--gsp-output-len", type=int, default=16)
    data.add_argument(
        "--request-rate", type=float, default=float("inf"), help="Poisson rate (req/s); inf: all at once"
    )
    data.add_argument("--max-concurrency", type=int, default=None)
    data.add_argument("--warmup-requests", type=int, default=2)
    data.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--wait-quiet", type=float, default=0.0, help="wait up to S s for other processes to go idle"
    )
    ap.add_argument(
        "--output-file", default=None, help="append results: .jsonl (one JSON per run) or Markdown"
    )
    return ap.parse_args(argv)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


async def first_model(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/models") as r:
        return str((await r.json())["data"][0]["id"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_logs()
    if args.tiny:
        model_path = serving_stack.tiny_served_model()
    elif args.model_path:
        model_path = args.model_path
    else:
        from sglang.engine.models.default_model import default_model_path

        model_path = default_model_path()
    reqs = build_dataset(args, load_tokenizer(model_path))
    OTHERS_LOAD[0] = common.wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else common.idle_load(1.0)
    args.num_prompts_effective = len(reqs)
    runs: list[tuple[str, dict[str, Any]]] = []
    extra = ""
    label = f"{args.workers}w {args.policy}" if args.launch else "router"

    async def router_target(url: str) -> dict[str, Any]:
        model = args.model or (await first_model(url) if args.backend == "openai" else "")
        return {"kind": "router", "url": url, "model": model}

    if args.direct_worker:
        runs.append(
            (
                "worker gRPC",
                asyncio.run(run_workload(args, reqs, {"kind": "worker", "addr": args.direct_worker})),
            )
        )
    elif args.launch:
        with serving_stack.launch(args, model_path) as up:
            target = asyncio.run(router_target(up.url))
            target["pids"] = lambda: serving_stack.descendants(up.proc.pid)
            target["flush"] = lambda: serving_stack.flush_caches(list(up.workers.values()))
            runs.append((f"router ({label})", asyncio.run(run_workload(args, reqs, target))))
            runs[-1][1]["routing"] = serving_stack.routing_decisions(up.url)
            routing = sorted(runs[-1][1]["routing"].items())
            extra = "routing (worker decision: requests, warm-up included): " + ", ".join(
                f"{k}: {n}" for k, n in routing
            )
            if args.compare_direct:
                pids = lambda: serving_stack.descendants(up.proc.pid)  # noqa: E731
                worker0 = {"kind": "worker", "addr": up.workers["worker-0"], "pids": pids}
                runs.append(("worker-0 gRPC", asyncio.run(run_workload(args, reqs, worker0))))
    else:
        runs.append((label, asyncio.run(run_workload(args, reqs, asyncio.run(router_target(args.base_url))))))

    if len(runs) == 2 and args.compare_direct:
        r, w = runs[0][1], runs[1][1]
        extra += "\n\n" + (
            f"router overhead: TTFT p50 {r['p50_ttft_ms'] - w['p50_ttft_ms']:+.2f} ms, "
            f"ITL p50 {r['p50_itl_ms'] - w['p50_itl_ms']:+.3f} ms, "
            f"E2E p50 {r['p50_e2e_ms'] - w['p50_e2e_ms']:+.2f} ms ({r['p50_e2e_ms'] / w['p50_e2e_ms']:.3f}x); "
            f"throughput {r['output_throughput'] / w['output_throughput']:.3f}x of direct"
        )
    print(hardware_line())
    print(
        f"model: {model_path}; dataset {args.dataset_name}, {len(reqs)} requests, rate {args.request_rate}, "
        f"max concurrency {args.max_concurrency}"
    )
    print(table(runs))
    if extra:
        print(extra)
    for name, s in runs:
        if s["failed"]:
            print(f"{name}: {s['failed']} failed, e.g. {s['errors'][:2]}")
    if args.output_file:
        write_output(args.output_file, args, runs, extra)


if __name__ == "__main__":
    main()
