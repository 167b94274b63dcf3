"""Polls the engine's stats on an interval: feeds the Prometheus gauges and the registry's load."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sglang.cluster.registry import WorkerLoad
from sglang.observability.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


class LoadMonitor:
    """Contract: :meth:`run` polls ``get_stats`` (blocking; run in a thread) every ``interval_s``
    until ``stop`` is set; :attr:`load` is the latest reading (zeros before the first).
    ``generated_tokens`` returns the running total of generated tokens, for the throughput gauge."""

    def __init__(
        self,
        get_stats: Callable[[], dict[str, Any]],
        interval_s: float,
        max_running_requests: int,
        metrics: WorkerMetrics | None = None,
        generated_tokens: Callable[[], int] = lambda: 0,
    ) -> None:
        self.get_stats = get_stats
        self.interval_s = interval_s
        self.metrics = metrics
        self.generated_tokens = generated_tokens
        self.load = WorkerLoad(max_running_requests=max_running_requests)
        self._last: tuple[float, int] | None = None
        self._last_pd: dict[str, float] = {}  # cumulative PD transfer counters at the last reading

    async def poll(self) -> WorkerLoad:
        stats = await asyncio.to_thread(self.get_stats)
        self.load = WorkerLoad(
            num_running_reqs=stats["num_running_reqs"],
            # A decode worker's queue is its prealloc + transfer stages (its waiting queue is empty).
            num_waiting_reqs=stats["num_waiting_reqs"] + stats.get("num_decode_prealloc_queue_reqs", 0)
            + stats.get("num_decode_transfer_queue_reqs", 0),
            token_usage=stats["token_usage"],
            cache_hit_rate=stats["cache_hit_rate"],
            num_cached_pages=stats["num_cached_pages"],
            max_running_requests=self.load.max_running_requests,
        )
        m = self.metrics
        if m is not None:
            m.child(m.num_running_reqs).set(stats["num_running_reqs"])  # type: ignore[union-attr]
            m.child(m.num_queue_reqs).set(stats["num_waiting_reqs"])  # type: ignore[union-attr]
            m.child(m.token_usage).set(stats["token_usage"])  # type: ignore[union-attr]
            m.child(m.cache_hit_rate).set(stats["cache_hit_rate"])  # type: ignore[union-attr]
            page_size = stats["max_total_tokens"] // max(stats["num_total_pages"], 1)
            m.child(m.num_used_tokens).set(stats["num_used_pages"] * page_size)  # type: ignore[union-attr]
            now, total = time.monotonic(), self.generated_tokens()
            if self._last is not None and now > self._last[0]:
                rate = (total - self._last[1]) / (now - self._last[0])
                m.child(m.gen_throughput).set(rate)  # type: ignore[union-attr]
            self._last = (now, total)
            self._observe_pd(m, stats)
        return self.load

    def _observe_pd(self, m: WorkerMetrics, stats: dict[str, Any]) -> None:
        for name in ("num_prefill_inflight_queue_reqs", "num_decode_prealloc_queue_reqs", "num_decode_transfer_queue_reqs"):
            m.child(getattr(m, name)).set(stats.get(name, 0))  # type: ignore[union-attr]
        keys = ("kv_transfer_bytes_total", "kv_transfer_seconds_total", "kv_transfer_wire_seconds_total",
                "kv_transfer_reqs_total", "kv_transfer_failed_reqs_total")
        now = {k: float(stats.get(k, 0)) for k in keys}
        delta = {k: max(now[k] - self._last_pd.get(k, 0.0), 0.0) for k in keys}
        self._last_pd = now
        m.child(m.kv_transfer_bytes_total).inc(delta["kv_transfer_bytes_total"])  # type: ignore[union-attr]
        m.child(m.kv_transfer_reqs_total).inc(delta["kv_transfer_reqs_total"])  # type: ignore[union-attr]
        m.child(m.num_transfer_failed_reqs_total).inc(delta["kv_transfer_failed_reqs_total"])  # type: ignore[union-attr]
        n, secs = delta["kv_transfer_reqs_total"], delta["kv_transfer_seconds_total"]
        wire = delta["kv_transfer_wire_seconds_total"] or secs  # speed: bytes over time on the wire
        if n > 0 and secs > 0:
            m.child(m.kv_transfer_speed_gb_s).set(delta["kv_transfer_bytes_total"] / wire / 1e9)  # type: ignore[union-attr]
            m.child(m.kv_transfer_latency_ms).set(secs / n * 1000.0)  # type: ignore[union-attr]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - a failed reading must not end the loop
                logger.exception("reading engine stats failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
