"""Run Triton kernels in the CPU interpreter from a pytest process.

``TRITON_INTERPRET=1`` must be set before kernels are decorated, so the interpreted cases run in one
worker subprocess (the test module itself, run as a script) that reads JSON lines ``{"fn", "kwargs"}``
on stdin and answers ``{"ok": float}`` or ``{"error": traceback}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]


class InterpreterWorker:
    """``script`` run with ``TRITON_INTERPRET=1``; ``call(fn, **kwargs)`` runs one case on CPU tensors."""

    def __init__(self, script: str) -> None:
        self._err: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the worker
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, script], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
        )

    def call(self, fn: str, **kwargs: Any) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"fn": fn, "kwargs": {"device": "cpu", **kwargs}}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self._err.seek(0)
            raise RuntimeError(f"interpreter worker died:\n{self._err.read()[-4000:]}")
        ans = json.loads(line)
        if "error" in ans:
            raise AssertionError(ans["error"])
        return float(ans["ok"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._err.close()
