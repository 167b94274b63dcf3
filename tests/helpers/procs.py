"""Real service processes for tests: ``python -m sglang_worker ...`` as a subprocess.

``make_tiny_worker_model(dir)`` writes a tiny Llama whose vocabulary is exactly the tiny
tokenizer's, so the worker loads both. ``spawn_worker(args)`` starts the worker (listening on
127.0.0.1 only), waits for its readiness line and returns a :class:`WorkerProc`; ``wait_ready`` can
be deferred to start several workers in parallel. Every wait is bounded; a worker that fails to
start is killed and its stderr is in the exception.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from typing_extensions import Self

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"^sglang_worker ready grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+) worker_id=(?P<worker_id>\S+)")
TINY_VOCAB = 320


def make_tiny_worker_model(directory: str | Path, vocab_size: int = TINY_VOCAB, seed: int = 0) -> Path:
    """Tiny random Llama + tiny BPE tokenizer in one folder (``len(tokenizer) == vocab_size``)."""
    from tests.helpers.tiny_models import make_tiny_model
    from tests.helpers.tokenizers import make_tiny_tokenizer

    path = Path(directory)
    make_tiny_tokenizer(str(path), vocab_size=vocab_size)
    make_tiny_model("llama", path, vocab_size=vocab_size, seed=seed)
    return path


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test environment plus the source folders (the worker package may not be installed)."""
    env = dict(os.environ)
    paths = [str(REPO / "libs"), str(REPO / "services" / "worker"), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


@dataclass
class ServiceProc:
    """A service subprocess whose stdout carries one readiness line (``READY``, parsed by
    ``_on_ready``). Shared by the worker and router test helpers."""

    proc: subprocess.Popen[str]
    stderr_path: str
    stdout_lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    SERVICE: ClassVar[str] = "service"
    READY: ClassVar[re.Pattern[str]]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _on_ready(self, m: re.Match[str]) -> None:
        raise NotImplementedError

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            m = self.READY.match(line)
            if m and not self._ready.is_set():
                self._on_ready(m)
                self._ready.set()

    def stderr_tail(self, chars: int = 4000) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]

    def wait_ready(self, timeout_s: float = 60.0) -> Self:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "timed out"
                tail = self.stderr_tail()
                self.stop(timeout_s=5)
                raise RuntimeError(f"{self.SERVICE} {why} before its readiness line; stderr:\n{tail}")
        return self

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def wait(self, timeout_s: float) -> int:
        """The exit status; raises ``subprocess.TimeoutExpired`` if still running after ``timeout_s``."""
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; always reaps the process and removes its log
        (set ``SGLANG_KEEP_TEST_LOGS=1`` to keep it). The exit status, None when it had to be killed."""
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            if not os.environ.get("SGLANG_KEEP_TEST_LOGS"):
                with contextlib.suppress(OSError):
                    os.remove(self.stderr_path)

    @classmethod
    def spawn(cls, module: str, argv: list[str], env: dict[str, str], wait: bool, timeout_s: float) -> Self:
        """Start ``python -m module *argv`` with stderr in a temp log and stdout watched."""
        fd, stderr_path = tempfile.mkstemp(prefix=f"sglang-{cls.SERVICE}-", suffix=".log")
        with os.fdopen(fd, "w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *argv],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True, env=env, cwd=str(REPO),
            )
        p = cls(proc=proc, stderr_path=stderr_path)
        threading.Thread(target=p._read_stdout, name=f"{cls.SERVICE}-{proc.pid}-stdout", daemon=True).start()
        return p.wait_ready(timeout_s) if wait else p


@dataclass
class WorkerProc(ServiceProc):
    addr: str = ""
    metrics_addr: str = ""  # "" when metrics are off
    worker_id: str = ""

    SERVICE: ClassVar[str] = "worker"
    READY: ClassVar[re.Pattern[str]] = READY

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def _on_ready(self, m: re.Match[str]) -> None:
        self.addr, self.worker_id = m["grpc"], m["worker_id"]
        self.metrics_addr = "" if m["metrics"] == "off" else m["metrics"]


def spawn_worker(
    args: list[str], env: dict[str, str] | None = None, wait: bool = True, timeout_s: float = 60.0
) -> WorkerProc:
    """Start ``python -m sglang_worker --host 127.0.0.1 --port 0 *args``."""
    argv = ["--host", "127.0.0.1", "--port", "0", *args]
    return WorkerProc.spawn("sglang_worker", argv, worker_env(env), wait, timeout_s)
