"""A small real mesh for tests: one redis-server, one worker process, one router process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.procs import WorkerProc, spawn_worker
from tests.helpers.redis_server import start_redis
from tests.helpers.router_procs import RouterProc, spawn_router


@contextlib.contextmanager
def one_worker_mesh(model_dir: Path, worker_args: list[str], timeout_s: float = 90) -> Iterator[tuple[WorkerProc, RouterProc]]:
    """Start Redis, a worker serving ``model_dir`` (``worker_args`` added) and a router; yield them
    once the router sees the worker; stop all three on exit (the router and worker drain)."""
    url, stop_redis = start_redis()
    worker = spawn_worker(["--redis-url", url, "--model-path", str(model_dir), *worker_args], wait=False)
    router = spawn_router(["--redis-url", url, "--discovery-interval-s", "0.2"], wait=False)
    try:
        yield worker.wait_ready(timeout_s), router.wait_ready().wait_healthy(workers=1, timeout_s=timeout_s)
    finally:
        router.terminate()
        worker.terminate()
        router.stop()
        worker.stop()
        stop_redis()
