"""Process supervision for ``sglang up``: start children in their own sessions, watch them,
and stop them in order (SIGTERM, wait, then SIGKILL the process group). See :mod:`sglang.cli`
for the contract; this module knows nothing about which services it runs."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
WORKER_ROLES = ("worker", "prefill", "decode")  # child names: worker-0, prefill-0, decode-0


def is_worker(name: str) -> bool:
    return name.split("-", 1)[0] in WORKER_ROLES

# ---- processes ---------------------------------------------------------------------------------
@dataclass
class ServiceSpec:
    """One child process: its name in the log prefix, argv, and the line that says it is ready."""

    name: str
    argv: list[str]
    ready: re.Pattern[str]
    echo: bool = True  # print its output (Redis is kept quiet unless it fails)
    env: dict[str, str] = field(default_factory=dict)


class Child:
    """A running child: its process, a task echoing its merged stdout/stderr, and its last lines."""

    def __init__(self, spec: ServiceSpec, proc: asyncio.subprocess.Process) -> None:
        self.spec = spec
        self.proc = proc
        self.tail: collections.deque[str] = collections.deque(maxlen=25)
        self.ready = asyncio.Event()
        self.ready_line = ""
        self.pump = asyncio.ensure_future(self._pump())

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        while True:
            try:
                raw = await self.proc.stdout.readline()
            except ValueError:  # a line longer than the stream's limit: take it in pieces
                raw = await self.proc.stdout.read(1 << 16)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            if self.spec.echo:
                print(f"{self.name:<9}| {line}", flush=True)
            if not self.ready.is_set() and self.spec.ready.search(line):
                self.ready_line = line
                self.ready.set()

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's process group (the child and anything it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def describe_exit(self) -> str:
        lines = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        return f"{self.name} (pid {self.proc.pid}) exited with code {self.proc.returncode}; last output:\n{lines}"


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the supervisor dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the supervisor died between fork and prctl
            os._exit(1)

    return preexec


class StartupError(RuntimeError):
    """The stack could not be brought up; the message says which part and why."""


class Supervisor:
    """Starts children, races waits against child deaths and signals, and stops them in order."""

    def __init__(self, stop_timeout: float) -> None:
        self.children: list[Child] = []
        self.stop_timeout = stop_timeout
        self.trouble = asyncio.Event()  # a stop was asked for, or a child died
        self.stop_requested = False
        self.stopping = False
        self.dead: Child | None = None
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self, spec: ServiceSpec) -> Child:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            limit=1 << 20,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        child = Child(spec, proc)
        self.children.append(child)
        self._watchers.append(asyncio.ensure_future(self._watch(child)))
        return child

    async def _watch(self, child: Child) -> None:
        await child.proc.wait()
        await child.pump
        if not self.stopping and self.dead is None:
            self.dead = child
            self.trouble.set()

    def request_stop(self) -> None:
        if self.stop_requested:  # second Ctrl-C: no more waiting
            print("sglang up: killing everything now", flush=True)
            for child in self.children:
                child.signal_group(signal.SIGKILL)
            return
        self.stop_requested = True
        self.trouble.set()

    async def race(self, aw: Awaitable[T], timeout: float, what: str) -> T:
        """Await ``aw`` unless a child dies, a stop is requested or ``timeout`` passes first."""
        task = asyncio.ensure_future(aw)
        trouble = asyncio.ensure_future(self.trouble.wait())
        try:
            await asyncio.wait({task, trouble}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            trouble.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self.dead is not None:
            raise StartupError(f"{what}: {self.dead.describe_exit()}")
        if self.stop_requested:
            raise StartupError(f"{what}: interrupted")
        raise StartupError(f"{what}: timed out after {timeout:.0f} s")

    async def wait_ready(self, children: list[Child], timeout: float) -> None:
        for child in children:
            await self.race(child.ready.wait(), timeout, f"waiting for {child.name} to be ready")

    async def stop_all(self) -> None:
        """Router first, then workers (they drain), then Redis; SIGKILL what outlives the timeout."""
        self.stopping = True
        stages: list[list[Child]] = [
            [c for c in self.children if c.name == "router"],
            [c for c in self.children if is_worker(c.name)],
            [c for c in self.children if c.name not in ("router", "redis") and not is_worker(c.name)],
            [c for c in self.children if c.name == "redis"],
        ]
        for stage in stages:
            if stage:
                await self._stop_stage(stage)
        for w in self._watchers:
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    async def _stop_stage(self, stage: list[Child]) -> None:
        for child in stage:
            if child.alive:
                child.signal_group(signal.SIGTERM)
        waits = [asyncio.ensure_future(c.proc.wait()) for c in stage]
        _, pending = await asyncio.wait(waits, timeout=self.stop_timeout)
        for child in stage:
            if child.alive:
                print(
                    f"sglang up: {child.name} did not stop in {self.stop_timeout:.0f} s; killing it",
                    flush=True,
                )
            # Also reaps anything the child left behind in its process group.
            child.signal_group(signal.SIGKILL)
        if pending:
            await asyncio.wait(pending, timeout=5)
        await asyncio.gather(*(c.pump for c in stage), return_exceptions=True)
        for child in stage:
            print(f"sglang up: {child.name} exited ({child.proc.returncode})", flush=True)


# ---- the plan ---------------------------------------------------------------------------------
