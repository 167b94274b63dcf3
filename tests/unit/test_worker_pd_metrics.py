"""The worker's PD transfer gauges: speed is bytes over the time writes were on the wire, latency
the mean send -> done time per request, each over the interval since the last reading."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from sglang.observability.metrics import WorkerMetrics
from sglang_worker.monitor import LoadMonitor

pytestmark = pytest.mark.unit


def _stats(nbytes: float, secs: float, wire: float, reqs: int) -> dict[str, float]:
    return {"kv_transfer_bytes_total": nbytes, "kv_transfer_seconds_total": secs,
            "kv_transfer_wire_seconds_total": wire, "kv_transfer_reqs_total": reqs,
            "kv_transfer_failed_reqs_total": 0}


def test_speed_uses_wire_time_and_latency_the_whole_wait() -> None:
    reg = CollectorRegistry()
    m = WorkerMetrics(reg, {"worker": "w"})
    mon = LoadMonitor(lambda: {}, 1.0, 8, metrics=m)

    def value(name: str) -> float | None:
        return reg.get_sample_value(name, {"worker": "w"})

    mon._observe_pd(m, _stats(4e9, 0.5, 0.02, 2))  # 4 GB: 20 ms on the wire, 500 ms send -> done
    assert value("sglang:kv_transfer_speed_gb_s") == pytest.approx(200.0)
    assert value("sglang:kv_transfer_latency_ms") == pytest.approx(250.0)
    mon._observe_pd(m, _stats(5e9, 0.6, 0.03, 3))  # the next interval: 1 GB in 10 ms, one request of 100 ms
    assert value("sglang:kv_transfer_speed_gb_s") == pytest.approx(100.0)
    assert value("sglang:kv_transfer_latency_ms") == pytest.approx(100.0)
    assert value("sglang:kv_transfer_bytes_total") == pytest.approx(5e9)


def test_without_wire_time_the_speed_falls_back_to_the_latency() -> None:
    """A sender that does not report wire time (another connector) still gets a speed."""
    reg = CollectorRegistry()
    m = WorkerMetrics(reg, {"worker": "w"})
    mon = LoadMonitor(lambda: {}, 1.0, 8, metrics=m)
    stats = _stats(1e9, 0.1, 0.0, 1)
    del stats["kv_transfer_wire_seconds_total"]
    mon._observe_pd(m, stats)
    assert reg.get_sample_value("sglang:kv_transfer_speed_gb_s", {"worker": "w"}) == pytest.approx(10.0)
