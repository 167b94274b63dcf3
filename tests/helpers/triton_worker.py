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
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

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


def serve(cases: dict[str, Callable[..., float]], setup: Callable[[], None] | None = None) -> None:
    """The worker side (a test module's ``__main__``): answer one JSON line per request line."""
    sys.path.insert(0, str(ROOT))
    if setup is not None:
        setup()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            ans: dict[str, Any] = {"ok": cases[req["fn"]](**req["kwargs"])}
        except Exception:
            ans = {"error": traceback.format_exc()}
        print(json.dumps(ans), flush=True)


def interpreter_fixture(script: str) -> Any:
    """A module-scoped ``interpreter`` fixture: one ``InterpreterWorker`` running ``script``."""

    @pytest.fixture(scope="module")
    def interpreter() -> Iterator[InterpreterWorker]:
        pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
        worker = InterpreterWorker(script)
        yield worker
        worker.close()

    return interpreter


def device_runner(request: pytest.FixtureRequest, cases: dict[str, Callable[..., float]]) -> Callable[..., float]:
    """``run(fn, **kwargs)`` on the test's ``device`` parameter: ``interpret`` through the module's
    ``interpreter`` fixture, ``cuda`` in-process (skipped without triton or a GPU)."""
    if request.node.callspec.params["device"] == "interpret":
        worker: InterpreterWorker = request.getfixturevalue("interpreter")
        return worker.call
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return lambda fn, **kw: cases[fn](device="cuda", **kw)
