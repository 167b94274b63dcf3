"""The mesh end to end: real redis-server, two real workers, several real routers, the real
``openai`` client.

- cache_aware: two prompt families with distinct long prefixes each stick to one worker (seen in
  the router's per-worker metrics and in ``cached_tokens``), while round_robin splits them;
- two router replicas with ``--shared-index`` send a prefix first routed by replica A to the same
  worker from replica B;
- ``kill -9`` of a worker: the request streaming from it ends with a clean error, new requests
  succeed on the other worker at once (a router that did not know yet retries), and the routers
  drop the dead worker within its heartbeat TTL. This test kills a module worker: it runs last.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.helpers.procs import WorkerProc, make_tiny_worker_model, spawn_worker
from tests.helpers.redis_server import start_redis
from tests.helpers.router_procs import RouterProc, metric_value, spawn_router

pytestmark = pytest.mark.e2e

HEARTBEAT_TTL_S = 2.0
WORKER_ARGS = ["--max-total-tokens", "8192", "--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", str(HEARTBEAT_TTL_S)]
ROUTER_ARGS = ["--discovery-interval-s", "0.2"]

FAMILY_A = "You are a pirate. " + "Arr, the sea is wide and the rum is gone; hoist the sails and sing. " * 5
FAMILY_B = "You are a poet. " + "Roses bloom in quiet gardens while the evening light grows soft. " * 5
QUESTIONS = ["How are you?", "Name a color.", "Count to three.", "Where is the ship?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_worker_model(tmp_path_factory.mktemp("tiny-mesh"))


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url, stop = start_redis()
    yield url
    stop()


@pytest.fixture(scope="module")
def mesh(redis_url: str, model_dir: Path) -> Iterator[tuple[dict[str, WorkerProc], dict[str, RouterProc]]]:
    """Two workers and four routers, all started at once (routers wait for workers by themselves)."""
    wprocs = [spawn_worker(["--redis-url", redis_url, "--model-path", str(model_dir), *WORKER_ARGS], wait=False) for _ in range(2)]
    base = ["--redis-url", redis_url, *ROUTER_ARGS]
    specs = {
        "cache_aware": ["--policy", "cache_aware"],
        "round_robin": ["--policy", "round_robin"],
        "shared_a": ["--policy", "cache_aware", "--shared-index"],
        "shared_b": ["--policy", "cache_aware", "--shared-index"],
    }
    rprocs = {name: spawn_router(base + args, wait=False) for name, args in specs.items()}
    try:
        ws = {w.worker_id: w for w in (p.wait_ready(90) for p in wprocs)}
        rs = {name: p.wait_ready().wait_healthy(workers=2, timeout_s=90) for name, p in rprocs.items()}
        yield ws, rs
    finally:
        for proc in [*rprocs.values(), *wprocs]:
            proc.terminate()  # all at once: each takes about a second to exit
        for r in rprocs.values():
            assert r.stop() == 0
        for w in wprocs:
            w.stop()


@pytest.fixture(scope="module")
def workers(mesh: tuple[dict[str, WorkerProc], dict[str, RouterProc]]) -> dict[str, WorkerProc]:
    return mesh[0]


@pytest.fixture(scope="module")
def routers(mesh: tuple[dict[str, WorkerProc], dict[str, RouterProc]]) -> dict[str, RouterProc]:
    return mesh[1]


def oai(router: RouterProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(router: RouterProc, system: str, question: str, **kw: Any) -> Any:
    return oai(router).chat.completions.create(
        model=next(iter(oai(router).models.list())).id,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=2, temperature=0, **kw,
    )


def routed_counts(router: RouterProc, worker_ids: Iterator[str] | list[str]) -> dict[str, float]:
    text = router.metrics()
    return {w: metric_value(text, "sglang_router:requests_total", worker=w) for w in worker_ids}


def routed_to(router: RouterProc, worker_ids: list[str], call: Callable[[], Any]) -> tuple[str, Any]:
    """Run ``call`` (one request) and return the worker the router's metrics say it went to."""
    before = routed_counts(router, worker_ids)
    result = call()
    after = routed_counts(router, worker_ids)
    moved = [w for w in worker_ids if after[w] > before[w]]
    assert len(moved) == 1 and after[moved[0]] == before[moved[0]] + 1, (before, after)
    return moved[0], result


SEQUENCE = [("A", 0), ("A", 1), ("B", 0), ("B", 1), ("A", 2), ("B", 2), ("A", 3), ("B", 3)]


def run_families(router: RouterProc, worker_ids: list[str]) -> tuple[dict[str, set[str]], dict[str, list[int]]]:
    seen: dict[str, set[str]] = {"A": set(), "B": set()}
    cached: dict[str, list[int]] = {"A": [], "B": []}
    for fam, q in SEQUENCE:
        system = FAMILY_A if fam == "A" else FAMILY_B
        wid, resp = routed_to(router, worker_ids, lambda s=system, q=q: chat(router, s, QUESTIONS[q]))
        seen[fam].add(wid)
        cached[fam].append(resp.usage.prompt_tokens_details.cached_tokens)
    return seen, cached


def test_cache_aware_keeps_each_family_on_one_worker(routers: dict[str, RouterProc], workers: dict[str, WorkerProc]) -> None:
    r = routers["cache_aware"]
    seen, cached = run_families(r, sorted(workers))
    assert len(seen["A"]) == 1 and len(seen["B"]) == 1 and seen["A"] != seen["B"], seen
    prefix_tokens = 60  # each family's system prompt is far longer; the worker reports its prefix hits
    assert all(c >= prefix_tokens for c in cached["A"][1:] + cached["B"][1:]), cached
    text = r.metrics()
    assert metric_value(text, "sglang_router:requests_total", policy="cache_aware", decision="cache_miss") == 2
    assert metric_value(text, "sglang_router:requests_total", policy="cache_aware", decision="cache_hit") == 6


def test_round_robin_splits_the_families(routers: dict[str, RouterProc], workers: dict[str, WorkerProc]) -> None:
    seen, _ = run_families(routers["round_robin"], sorted(workers))
    assert seen == {"A": set(workers), "B": set(workers)}, seen


def test_shared_index_replicas_agree_where_a_prefix_lives(routers: dict[str, RouterProc], workers: dict[str, WorkerProc]) -> None:
    a, b, ids = routers["shared_a"], routers["shared_b"], sorted(workers)
    for k in range(4):
        system = f"Shared prefix number {k}. " + "Tell the same long story again and again, word for word. " * 4
        first, _ = routed_to(a, ids, lambda s=system: chat(a, s, QUESTIONS[0]))
        second, _ = routed_to(b, ids, lambda s=system: chat(b, s, QUESTIONS[1]))
        assert second == first, k
    assert metric_value(b.metrics(), "sglang_router:requests_total", decision="cache_hit") == 4
    assert metric_value(a.metrics(), "sglang_router:requests_total", decision="cache_miss") == 4


def _stream_generate(router: RouterProc, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    u = urllib.parse.urlsplit(router.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def _next_event(resp: http.client.HTTPResponse) -> Any:
    while True:
        line = resp.readline()
        if not line:
            return None
        if line.startswith(b"data: "):
            data = line[len(b"data: "):].strip()
            return "[DONE]" if data == b"[DONE]" else json.loads(data)


def test_kill_9_worker_fails_in_flight_cleanly_and_routing_moves_on(
    routers: dict[str, RouterProc], workers: dict[str, WorkerProc]
) -> None:
    ca, rr = routers["cache_aware"], routers["round_robin"]
    body = {"text": "Tell me a very long story.", "stream": True,
            "sampling_params": {"max_new_tokens": 1000, "temperature": 0, "ignore_eos": True}}
    conn, resp = _stream_generate(ca, body)
    first = _next_event(resp)
    victim_id = first["meta_info"]["worker_id"]
    survivor_id = next(w for w in workers if w != victim_id)
    workers[victim_id].kill()  # SIGKILL
    t0 = time.monotonic()

    events = []
    while (ev := _next_event(resp)) not in (None, "[DONE]"):
        events.append(ev)
    conn.close()
    assert time.monotonic() - t0 < 10, "the in-flight request hung"
    assert "error" in events[-1] and events[-1]["error"]["code"] == "worker_unavailable", events[-1]
    assert events[-1]["error"]["type"] == "service_unavailable"
    assert all("error" not in e and e["meta_info"]["finish_reason"] is None for e in events[:-1])

    # round_robin has not seen the failure: a request it sends to the dead worker is retried on the
    # survivor (round robin alternates, so two of these four try the dead worker first)
    before = routed_counts(rr, [victim_id, survivor_id])
    for q in QUESTIONS:
        assert chat(rr, FAMILY_A, q).choices[0].finish_reason in ("length", "stop")
    after = routed_counts(rr, [victim_id, survivor_id])
    assert after[survivor_id] - before[survivor_id] == 4 and after[victim_id] > before[victim_id]
    assert metric_value(rr.metrics(), "sglang_router:upstream_errors_total", worker=victim_id, code="unavailable") >= 1
    # cache_aware marked it failed on the broken stream: straight to the survivor
    for q in QUESTIONS:
        wid, _ = routed_to(ca, [victim_id, survivor_id], lambda q=q: chat(ca, FAMILY_B, q))
        assert wid == survivor_id

    deadline = t0 + HEARTBEAT_TTL_S + 3.0
    for r in routers.values():
        r.wait_healthy(workers=1, timeout_s=max(0.1, deadline - time.monotonic()))
    assert time.monotonic() - t0 < HEARTBEAT_TTL_S + 3.0
    for name in ("round_robin", "shared_a"):
        for q in QUESTIONS[:2]:
            wid, _ = routed_to(routers[name], [victim_id, survivor_id], lambda r=routers[name], q=q: chat(r, FAMILY_A, q))
            assert wid == survivor_id
