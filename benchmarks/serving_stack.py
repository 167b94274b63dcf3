"""The stack side of ``benchmarks/serving.py``: start ``sglang up`` for a run (``--launch``), read
its workers' addresses, flush their caches, read the router's routing counters, and account the
CPU that the client, the stack and everything else on a shared machine used during a run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import common


def proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class CpuMeter:
    """CPU seconds used during a run by this client, by the served stack (``pids``: a launched
    ``sglang up`` and its children) and by everything else on the shared machine, in cores."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.machine = common.LoadMeter()
        self.own0 = sum(os.times()[:2])
        self.stack0 = sum(proc_cpu_s(p) for p in pids)
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        client = sum(os.times()[:2]) - self.own0
        stack = sum(proc_cpu_s(p) for p in self.pids) - self.stack0
        others = self.machine.others_cores() - (stack / wall if self.pids else 0.0)
        return {
            "client_cores": client / wall,
            "stack_cores": stack / wall if self.pids else float("nan"),
            "others_cores": max(others, 0.0) if self.pids else float("nan"),
        }


class Launched:
    """``sglang up`` in the background; its URL and worker-0's gRPC address once ready."""

    READY = re.compile(r"sglang up: ready at (http://\S+)")
    WORKER = re.compile(r"(worker-\d+)\s*\| sglang_worker ready grpc=(\S+)")

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url = ""
        self.workers: dict[str, str] = {}  # worker-N -> gRPC address
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if m := self.WORKER.search(line):
                self.workers[m.group(1)] = m.group(2)
            if m := self.READY.search(line):
                self.url = m.group(1)
                self.ready.set()
        self.ready.set()

    def wait(self, timeout: float) -> None:
        self.ready.wait(timeout)
        if not self.url:
            tail = "\n".join(self.lines[-30:])
            raise SystemExit(f"sglang up did not become ready:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextlib.contextmanager
def launch(args: argparse.Namespace, model_path: str) -> Iterator[Launched]:
    exe = Path(sys.executable).parent / "sglang"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "sglang.cli"]
    argv += ["up", "--model-path", model_path, "--workers", str(args.workers), "--policy", args.policy]
    argv += ["--port", str(args.port or free_port()), "--log-level", "warning"]
    for flag in ("dtype", "load_format", "page_size", "max_total_tokens"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    up = Launched(argv)
    try:
        up.wait(args.launch_timeout)
        yield up
    finally:
        up.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_served_model() -> str:
    """The benchmarks' tiny random Llama with SmolLM2's vocabulary and tokenizer files copied in,
    so the router can tokenize and detokenize (built once under the benchmark cache)."""
    import shutil

    from sglang.engine.models.default_model import default_model_path

    smol = Path(default_model_path())
    cfg = json.loads((smol / "config.json").read_text())
    special = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    path = Path(common.tiny_llama_path(vocab_size=cfg["vocab_size"], **special))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if not (path / name).exists():
            shutil.copy(smol / name, path / name)
    return str(path)


def routing_decisions(url: str) -> dict[str, int]:
    """``"worker-id-suffix decision" -> requests`` from the router's ``sglang_router:requests_total``
    (warm-up requests included)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, int] = {}
    for m in re.finditer(r"^sglang_router:requests_total\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = f"{labels.get('worker', '?')[-6:]} {labels.get('decision', '?')}"
        out[key] = out.get(key, 0) + int(float(m.group(2)))
    return out


async def flush_caches(addrs: list[str]) -> None:
    """Empty every launched worker's prefix cache after the warm-up, so runs start cold."""
    from sglang.transport.worker_client import WorkerClient

    for addr in addrs:
        async with WorkerClient(addr) as client:
            await client.flush_cache()
