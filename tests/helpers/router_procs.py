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
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, ClassVar

from tests.helpers.procs import REPO, ServiceProc, worker_env

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
class RouterProc(ServiceProc):
    url: str = ""  # http://127.0.0.1:PORT
    grpc_addr: str = ""
    _terminated: bool = False

    SERVICE: ClassVar[str] = "router"
    READY: ClassVar[re.Pattern[str]] = READY

    def _on_ready(self, m: re.Match[str]) -> None:
        self.url, self.grpc_addr = m["http"], m["grpc"]

    def wait_ready(self, timeout_s: float = 30.0) -> RouterProc:
        return super().wait_ready(timeout_s)

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
    argv = ["--host", "127.0.0.1", "--port", "0", "--grpc-port", "-1", *args]
    return RouterProc.spawn("sglang_router", argv, router_env(env), wait, timeout_s)
