"""The engine's scheduler thread: takes commands from a queue, steps the scheduler, and hands
each updated request to its sink. All scheduler state is touched only on this thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from sglang.engine.scheduler.request import Request
from sglang.engine.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

Sink = Callable[[Request], None]

# While work is pending but nothing can run (only KV transfers in flight), the loop polls this
# often; it bounds the latency added to a transfer's completion (a 4k-token 8B prompt moves in
# about 1.4 ms GPU to GPU over NVLink, so even 0.2 ms here cost ~10% of the measured rate).
IDLE_POLL_S = 0.00005


@dataclass
class _Add:
    req: Request
    sink: Sink


@dataclass
class _Abort:
    rid: str


@dataclass
class _Call:
    fn: Callable[[Scheduler], Any]
    fut: Future[Any]


class _Stop:
    pass


class EngineLoop:
    """Owns the scheduler thread. ``submit``/``abort``/``call`` are safe from any thread.

    Contract: a sink is called on the loop thread with the live request after every step that
    changed it, last with ``req.finished`` True; it must copy what it needs and not block.
    """

    def __init__(self, scheduler: Scheduler, check_integrity_when_idle: bool = True) -> None:
        self.scheduler = scheduler
        self.check_when_idle = check_integrity_when_idle
        self._inbox: queue.Queue[_Add | _Abort | _Call | _Stop] = queue.Queue()
        self._sinks: dict[str, Sink] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sglang-scheduler", daemon=True)
        self._thread.start()

    def submit(self, req: Request, sink: Sink) -> None:
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        self._inbox.put(_Add(req, sink))

    def abort(self, rid: str) -> None:
        self._inbox.put(_Abort(rid))

    def call(self, fn: Callable[[Scheduler], Any], timeout: float | None = 60.0) -> Any:
        """Run ``fn(scheduler)`` on the loop thread between steps and return its result."""
        fut: Future[Any] = Future()
        self._inbox.put(_Call(fn, fut))
        return fut.result(timeout=timeout)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._inbox.put(_Stop())
        self._thread.join(timeout=30)

    def _handle(self, cmd: _Add | _Abort | _Call | _Stop) -> bool:
        sched = self.scheduler
        if isinstance(cmd, _Stop):
            for req in sched.abort_all("the engine is shutting down"):
                self._emit(req)
            return False
        if isinstance(cmd, _Add):
            self._sinks[cmd.req.rid] = cmd.sink
            sched.add_request(cmd.req)
        elif isinstance(cmd, _Abort):
            aborted = sched.abort(cmd.rid)
            if aborted is not None:
                self._emit(aborted)
        else:
            try:
                cmd.fut.set_result(cmd.fn(sched))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                cmd.fut.set_exception(e)
        return True

    def _emit(self, req: Request) -> None:
        sink = self._sinks.get(req.rid)
        if sink is None:
            return
        if req.finished:
            del self._sinks[req.rid]
        try:
            sink(req)
        except Exception:  # a broken consumer must not stop the engine
            logger.exception("output sink for %s failed", req.rid)

    def _run(self) -> None:
        sched = self.scheduler
        while True:
            try:
                # Block when there is nothing to do; when only waiting on KV transfers, wait a
                # short while for commands instead of spinning.
                block = not sched.has_work() or sched.idle
                timeout = None if not sched.has_work() else (0.0 if sched.hot() else IDLE_POLL_S)
                while True:
                    try:
                        cmd = self._inbox.get(block=block, timeout=timeout)
                    except queue.Empty:
                        break
                    if not self._handle(cmd):
                        return
                    block = False
                for req in sched.step():
                    self._emit(req)
                if not sched.has_work() and self.check_when_idle:
                    sched.check_integrity()
            except Exception as e:
                logger.exception("scheduler step failed; aborting in-flight requests")
                self.error = e
                for req in sched.abort_all(f"internal error: {e}"):
                    self._emit(req)
