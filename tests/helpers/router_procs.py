"""A real router process for tests: ``python -m sglang_router`` on 127.0.0.1 with free ports.

``spawn_router(args)`` starts it with ``--port 0 --grpc-port -1`` (both printed in its readiness
line), waits for that line and returns a :class:`RouterProc`; ``wait_healthy(workers=N)`` polls
``/health`` until N workers are routable. Every wait is bounded; a router that fails to start is
killed and its stderr is in the exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tests.helpers.procs import REPO, worker_env

READY = re.compile(r"^sglang_router ready http=(?P<http>\S+) grpc=(?P<grpc>\S+)")


def router_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = worker_env(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "services" / "router"), env["PYTHONPATH"]])
    return env


def http_json(url: str, body: Any = None, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON body or text, headers) of a GET (``body`` None) or POST."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers)
    text = raw.decode()
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs


@dataclass
class RouterProc:
    proc: subprocess.Popen[str]
    stderr_path: str
    url: str = ""  # http://127.0.0.1:PORT
    grpc_addr: str = ""
    stdout_lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _terminated: bool = False

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            m = READY.match(line)
            if m and not self._ready.is_set():
                self.url, self.grpc_addr = m["http"], m["grpc"]
                self._ready.set()

    def stderr_tail(self, chars: int = 4000) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]

    def wait_ready(self, timeout_s: float = 30.0) -> RouterProc:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "timed out"
                tail = self.stderr_tail()
                self.stop(timeout_s=5)
                raise RuntimeError(f"router {why} before its readiness line; stderr:\n{tail}")
        return self

    def health(self) -> tuple[int, Any]:
        status, body, _ = http_json(self.url + "/health", timeout_s=5)
        return status, body

    def wait_healthy(self, workers: int = 1, timeout_s: float = 60.0) -> RouterProc:
        """Until ``/health`` is 200 with exactly ``workers`` routable workers."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, last = self.health()
                if status == 200 and last.get("workers") == workers:
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"router not healthy with {workers} workers: {last}; stderr:\n{self.stderr_tail()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def terminate(self) -> None:
        """SIGTERM (once) without waiting: stop several processes at once, then ``stop()`` each."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit status (None when it had to be killed)."""
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None
        finally:
            if not os.environ.get("SGLANG_KEEP_TEST_LOGS"):
                with contextlib.suppress(OSError):
                    os.remove(self.stderr_path)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        rest = head[len(name):]
        if rest and not rest.startswith("{"):
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def spawn_router(args: list[str], env: dict[str, str] | None = None, wait: bool = True, timeout_s: float = 30.0) -> RouterProc:
    fd, stderr_path = tempfile.mkstemp(prefix="sglang-router-", suffix=".log")
    with os.fdopen(fd, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_router", "--host", "127.0.0.1", "--port", "0", "--grpc-port", "-1", *args],
            stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
            env=router_env(env), cwd=str(REPO),
        )
    r = RouterProc(proc=proc, stderr_path=stderr_path)
    threading.Thread(target=r._read_stdout, name=f"router-{proc.pid}-stdout", daemon=True).start()
    return r.wait_ready(timeout_s) if wait else r
