"""The worker service end to end: a real ``python -m sglang_worker`` process, a real redis-server.

Two workers start once for the module (in parallel): ``main`` serves every functional test and is
SIGKILLed by the last test; ``victim`` is drained with SIGTERM. Outputs are compared token for
token with ``sglang.Engine`` run in this process on the same tiny model and settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from sglang.cluster.kv_events import CLEARED_SEQ, decode_entry, stream_key
from sglang.cluster.registry import WorkerRegistry
from sglang.engine.engine import Engine
from sglang.engine.prefix_cache.events import AllBlocksCleared, BlockStored, hash_pages
from sglang.transport.types import GenerateEvent, GenerateInput, WorkerUnavailable
from sglang.transport.worker_client import WorkerClient

from tests.helpers.procs import TINY_VOCAB, WorkerProc, make_tiny_worker_model, spawn_worker
from tests.helpers.redis_server import start_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

T = TypeVar("T")
PAGE = 4
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--page-size", str(PAGE), "--max-total-tokens", "4096",
                "--chunked-prefill-size", "16", "--max-running-requests", "8"]
TTL_S = 1.0
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def run(coro_fn: Callable[[WorkerClient], Awaitable[T]], addr: str) -> T:
    """Run ``coro_fn(client)`` in a fresh event loop with a fresh client (channels are per loop)."""

    async def go() -> T:
        async with WorkerClient(addr) as client:
            return await coro_fn(client)

    return asyncio.run(go())


async def collect(client: WorkerClient, inp: GenerateInput) -> list[GenerateEvent]:
    return [ev async for ev in client.generate(inp)]


def prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(5, TINY_VOCAB) for _ in range(n)]


def wait_until(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return cond()


def scrape(metrics_addr: str) -> str:
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5) as r:
        return str(r.read().decode())


def metric_value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url, stop = start_redis()
    try:
        yield url
    finally:
        stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_worker_model(tmp_path_factory.mktemp("tiny-worker"))


@pytest.fixture(scope="module")
def workers(model_dir: Path, redis_url: str) -> Iterator[dict[str, WorkerProc]]:
    common = ["--model-path", str(model_dir), *ENGINE_FLAGS, "--redis-url", redis_url,
              "--heartbeat-interval-s", "0.2", "--heartbeat-ttl-s", str(TTL_S), "--metrics-port", "0"]
    tag = f"{os.getpid()}"
    procs = {
        "main": spawn_worker([*common, "--worker-id", f"main-{tag}"], wait=False),
        "victim": spawn_worker([*common, "--worker-id", f"victim-{tag}", "--drain-timeout-s", "20"], wait=False),
    }
    try:
        for p in procs.values():
            p.wait_ready(timeout_s=90)
        yield procs
    finally:
        for p in procs.values():
            p.stop(timeout_s=10)


@pytest.fixture(scope="module")
def main_worker(workers: dict[str, WorkerProc]) -> WorkerProc:
    return workers["main"]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine(model_path=str(model_dir), device="cpu", dtype="float32", page_size=PAGE, max_total_tokens=4096,
                 chunked_prefill_size=16, max_running_requests=8)
    yield eng
    eng.shutdown()


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# ---- serving ----------------------------------------------------------------------------------
def test_health_and_model_info(main_worker: WorkerProc, model_dir: Path) -> None:
    async def go(c: WorkerClient) -> tuple[list[bool], dict[str, Any]]:
        healths = [await c.health(), await c.health("liveness"), await c.health("sglang.v1.Worker")]
        return healths, await c.get_model_info()

    healths, info = run(go, main_worker.addr)
    assert healths == [True, True, True]
    assert info == {
        "model_path": str(model_dir), "served_model_name": model_dir.name, "architecture": "LlamaForCausalLM",
        "context_length": 1024, "vocab_size": TINY_VOCAB, "page_size": PAGE, "dtype": "float32", "role": "unified",
        "eos_token_ids": [1, 2], "max_total_tokens": 4096,
    }


@pytest.mark.parametrize("stream", [True, False])
def test_greedy_generate_matches_the_in_process_engine(main_worker: WorkerProc, engine: Engine, stream: bool) -> None:
    ids = prompt(23, seed=1 + stream)
    params = {**GREEDY, "max_new_tokens": 12}
    ref = engine.generate(input_ids=ids, sampling_params=params)
    assert isinstance(ref, dict)
    inp = GenerateInput(request_id=f"greedy-{stream}", input_ids=ids, sampling_params=params, stream=stream)
    events = run(lambda c: collect(c, inp), main_worker.addr)
    chunks, last = events[:-1], events[-1]
    assert [e.kind for e in chunks] == ["chunk"] * len(chunks)
    assert last.kind == "complete"
    tokens = [t for e in events for t in e.token_ids]
    assert tokens == ref["output_ids"]
    assert len(tokens) == 12
    if stream:
        assert len(chunks) >= 2  # tokens went out as they were produced
        assert [e.completion_tokens for e in chunks] == [sum(len(x.token_ids) for x in chunks[: i + 1]) for i in range(len(chunks))]
    else:
        assert chunks == [] and last.token_ids == ref["output_ids"]
    assert last.finish_reason == ref["meta_info"]["finish_reason"] == {"type": "length"}
    assert (last.prompt_tokens, last.completion_tokens) == (23, 12)
    assert all(e.request_id == inp.request_id for e in events)


def test_logprobs_match_the_engine(main_worker: WorkerProc, engine: Engine) -> None:
    ids = prompt(10, seed=7)
    params = {**GREEDY, "max_new_tokens": 5}
    ref = engine.generate(input_ids=ids, sampling_params=params, return_logprob=True, logprob_start_len=0,
                          top_logprobs_num=3)
    assert isinstance(ref, dict)
    meta = ref["meta_info"]
    inp = GenerateInput(request_id="lp", input_ids=ids, sampling_params=params, return_logprob=True,
                        logprob_start_len=0, top_logprobs_num=3, stream=True)
    events = run(lambda c: collect(c, inp), main_worker.addr)
    out_lp = [x for e in events for x in e.output_logprobs]
    assert [tok for _, tok, _ in out_lp] == ref["output_ids"]
    for (lp, tok, top), (rlp, rtok, _), rtop in zip(out_lp, meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True):
        assert tok == rtok and lp == pytest.approx(rlp, abs=1e-5)
        assert top is not None and [t for _, t in top] == [t for _, t, _ in rtop]
        assert [x for x, _ in top] == pytest.approx([x for x, _, _ in rtop], abs=1e-5)
    inp_lp = events[-1].input_logprobs
    assert len(inp_lp) == len(ids)
    assert inp_lp[0] == (None, ids[0], None)
    assert [t for _, t, _ in inp_lp] == ids
    assert [x for x, _, _ in inp_lp[1:]] == pytest.approx([x for x, _, _ in meta["input_token_logprobs"][1:]], abs=1e-5)
    # Without return_logprob, none are sent.
    plain = run(lambda c: collect(c, GenerateInput(request_id="nolp", input_ids=ids, sampling_params=params)), main_worker.addr)
    assert all(e.output_logprobs == [] and e.input_logprobs == [] for e in plain)


@pytest.mark.parametrize(
    ("ids", "params", "param"),
    [
        ([5, 6, 7], {"temperature": -1.0}, "temperature"),
        ([5, 6, 7], {"top_p": 0.0}, "top_p"),
        ([5, TINY_VOCAB + 10], {}, "input_ids"),
        ([], {}, "input_ids"),
        ([5, 6, 7], {"n": 2}, "n"),
        ([5, 6, 7], {"regex": "a", "ebnf": "root ::= \"a\""}, "regex"),
        ([5] * 1100, {}, "input_ids"),
    ],
)
def test_bad_input_is_an_error_event_and_the_worker_keeps_serving(
    main_worker: WorkerProc, ids: list[int], params: dict[str, Any], param: str
) -> None:
    async def go(c: WorkerClient) -> tuple[list[GenerateEvent], list[GenerateEvent]]:
        bad = await collect(c, GenerateInput(request_id="bad", input_ids=ids, sampling_params=params))
        good = await collect(c, GenerateInput(request_id="good", input_ids=[5, 6, 7],
                                              sampling_params={**GREEDY, "max_new_tokens": 2}))
        return bad, good

    bad, good = run(go, main_worker.addr)
    assert len(bad) == 1
    assert (bad[0].kind, bad[0].error_code, bad[0].error_param) == ("error", 400, param)
    assert bad[0].error_message
    assert [e.kind for e in good][-1] == "complete" and good[-1].completion_tokens == 2


def test_cancelling_the_stream_aborts_the_request_on_the_worker(main_worker: WorkerProc) -> None:
    before = metric_value(scrape(main_worker.metrics_addr), "sglang:num_aborted_requests_total")

    async def go(c: WorkerClient) -> tuple[int, float]:
        inp = GenerateInput(request_id="cancel-me", input_ids=prompt(8, 3),
                            sampling_params={**GREEDY, "max_new_tokens": 900})
        got = 0
        async with contextlib.aclosing(c.generate(inp)) as events:
            async for ev in events:
                got += len(ev.token_ids)
                if got >= 3:
                    break
        t0 = time.monotonic()
        while (await c.get_load())["num_running_reqs"] != 0 and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.02)
        return (await c.get_load())["num_running_reqs"], time.monotonic() - t0

    running, waited = run(go, main_worker.addr)
    assert running == 0 and waited < 5
    assert wait_until(
        lambda: metric_value(scrape(main_worker.metrics_addr), "sglang:num_aborted_requests_total") == before + 1, 5
    )


def test_deadline_raises_worker_unavailable_and_the_worker_aborts(main_worker: WorkerProc) -> None:
    before = metric_value(scrape(main_worker.metrics_addr), "sglang:num_aborted_requests_total")

    async def go(c: WorkerClient) -> int:
        inp = GenerateInput(request_id="too-slow", input_ids=prompt(8, 6),
                            sampling_params={**GREEDY, "max_new_tokens": 1000})
        with pytest.raises(WorkerUnavailable, match="DEADLINE_EXCEEDED"):
            async for _ in c.generate(inp, timeout_s=0.1):
                pass
        t0 = time.monotonic()
        while (await c.get_load())["num_running_reqs"] and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.02)
        return int((await c.get_load())["num_running_reqs"])

    assert run(go, main_worker.addr) == 0
    assert wait_until(
        lambda: metric_value(scrape(main_worker.metrics_addr), "sglang:num_aborted_requests_total") == before + 1, 5
    )


def test_abort_rpc_ends_the_stream_with_finish_reason_abort(main_worker: WorkerProc) -> None:
    async def go(c: WorkerClient) -> tuple[bool, bool, list[GenerateEvent]]:
        inp = GenerateInput(request_id="abort-me", input_ids=prompt(8, 4),
                            sampling_params={**GREEDY, "max_new_tokens": 900})
        events: list[GenerateEvent] = []
        found = False
        async for ev in c.generate(inp):
            events.append(ev)
            if len(events) == 2:
                found = await c.abort("abort-me")
        return found, await c.abort("no-such-request"), events

    found, unknown, events = run(go, main_worker.addr)
    assert found is True and unknown is False
    assert events[-1].kind == "complete"
    assert events[-1].finish_reason is not None and events[-1].finish_reason["type"] == "abort"
    assert events[-1].completion_tokens < 900


def test_flush_cache_and_kv_events_in_redis(main_worker: WorkerProc, rds: redis.Redis) -> None:
    key = stream_key("sglang", main_worker.worker_id)
    ids = prompt(4 * PAGE + 2, seed=11)  # 4 whole pages + 2 tokens

    async def go(c: WorkerClient) -> tuple[bool, dict[str, Any], dict[str, Any]]:
        assert await c.flush_cache()
        await collect(c, GenerateInput(request_id="kv", input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 3}))
        loaded = await c.get_load()
        return await c.flush_cache(), loaded, await c.get_load()

    start_id = rds.xrevrange(key, count=1)[0][0]  # the stream exists: the forwarder's start marker
    flushed, loaded, after = run(go, main_worker.addr)
    assert flushed is True
    assert loaded["num_cached_pages"] >= 4 and after["num_cached_pages"] == 0
    assert after["num_running_reqs"] == 0 and after["num_total_pages"] == 4096 // PAGE

    def batches() -> list[Any]:
        return [decode_entry(f)[1] for _, f in rds.xrange(key, min=b"(" + start_id)]

    assert wait_until(lambda: any(isinstance(e, AllBlocksCleared) for b in batches()[1:] for e in b.events), 5)
    got = batches()
    assert all(b.seq != CLEARED_SEQ for b in got)
    events = [e for b in got for e in b.events]
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert stored, events
    for ev in stored:  # every stored run carries the documented chained hashes of its tokens
        assert ev.block_size == PAGE
        assert ev.block_hashes == hash_pages(ev.token_ids, PAGE, ev.extra_key, ev.parent_block_hash)
    roots = [ev for ev in stored if ev.parent_block_hash is None]
    assert any(ev.token_ids[: 4 * PAGE] == ids[: 4 * PAGE] for ev in roots)
    assert isinstance(events[-1], AllBlocksCleared)  # the second flush
    assert [b.seq for b in got] == sorted(b.seq for b in got)
    assert rds.pttl(key) > 0  # the stream does not outlive a dead worker forever


def test_registry_record_load_and_ttl(main_worker: WorkerProc, redis_url: str, rds: redis.Redis) -> None:
    async def go(c: WorkerClient) -> tuple[dict[str, Any], Any]:
        await collect(c, GenerateInput(request_id="reg", input_ids=prompt(3 * PAGE, 12),
                                       sampling_params={**GREEDY, "max_new_tokens": 2}))
        load = await c.get_load()
        reg = WorkerRegistry.from_url(redis_url)
        try:  # heartbeats carry the load polled every interval (0.2 s here)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3:
                rec = {r.worker_id: r for r in await reg.list_workers()}[main_worker.worker_id]
                if rec.load.num_cached_pages == load["num_cached_pages"] and rec.load.num_running_reqs == 0:
                    break
                await asyncio.sleep(0.05)
            return load, rec
        finally:
            await reg.close()

    load, rec = run(go, main_worker.addr)
    assert load["num_cached_pages"] >= 3
    assert (rec.load.num_cached_pages, rec.load.num_running_reqs, rec.load.max_running_requests) == (
        load["num_cached_pages"], 0, 8)
    assert rec.grpc_addr == main_worker.addr
    assert rec.metrics_addr == main_worker.metrics_addr
    assert (rec.role, rec.page_size, rec.context_length, rec.draining) == ("unified", PAGE, 1024, False)
    assert rec.model == Path(rec.model_path).name
    assert time.time() - rec.heartbeat_at < 1.0
    pttl = rds.pttl(f"sglang:worker:{main_worker.worker_id}")
    assert 0 < pttl <= TTL_S * 1000


def test_metrics_endpoint(main_worker: WorkerProc) -> None:
    text = scrape(main_worker.metrics_addr)
    assert f'worker_id="{main_worker.worker_id}"' in text
    assert metric_value(text, "sglang:num_requests_total") >= 3
    assert metric_value(text, "sglang:generation_tokens_total") >= 12
    assert metric_value(text, "sglang:time_to_first_token_seconds_count") >= 3
    assert metric_value(text, "sglang:inter_token_latency_seconds_count") >= 11
    assert metric_value(text, "sglang:e2e_request_latency_seconds_count") >= 3
    for gauge in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate"):
        assert gauge + "{" in text


# ---- lifecycle --------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_work_then_deregisters_and_exits_0(
    workers: dict[str, WorkerProc], redis_url: str, rds: redis.Redis
) -> None:
    victim = workers["victim"]
    key = f"sglang:worker:{victim.worker_id}"
    assert rds.exists(key)

    async def go(c: WorkerClient) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        # Long enough (about 0.5 s here) for the checks below to run while it is in flight.
        inp = GenerateInput(request_id="long", input_ids=prompt(8, 5), sampling_params={**GREEDY, "max_new_tokens": 900})
        events: list[GenerateEvent] = []
        async for ev in c.generate(inp):
            events.append(ev)
            if len(events) == 1:
                victim.terminate()
                t0 = time.monotonic()
                while await c.health() and time.monotonic() - t0 < 5:
                    await asyncio.sleep(0.01)
                seen["ready"] = await c.health()
                seen["live"] = await c.health("liveness")
                reg = WorkerRegistry.from_url(redis_url)
                recs = {r.worker_id: r for r in await reg.list_workers(include_draining=True)}
                seen["draining"] = recs[victim.worker_id].draining
                seen["listed"] = victim.worker_id in {r.worker_id for r in await reg.list_workers()}
                await reg.close()
                seen["new"] = await collect(c, GenerateInput(request_id="late", input_ids=[5, 6]))
        seen["events"] = events
        return seen

    seen = run(go, victim.addr)
    assert seen["ready"] is False and seen["live"] is True
    assert seen["draining"] is True and seen["listed"] is False
    assert [(e.kind, e.error_code) for e in seen["new"]] == [("error", 503)]
    last = seen["events"][-1]
    assert last.kind == "complete" and last.finish_reason == {"type": "length"}
    assert sum(len(e.token_ids) for e in seen["events"]) == 900  # in-flight work finished
    assert victim.wait(timeout_s=20) == 0
    assert not rds.exists(key)
    assert not rds.sismember("sglang:workers", victim.worker_id)
    # The KV stream ends with the forwarder's stop marker.
    _, last_batch = decode_entry(rds.xrevrange(stream_key("sglang", victim.worker_id), count=1)[0][1])
    assert last_batch.seq == CLEARED_SEQ


def test_sigkill_record_expires_within_the_ttl(main_worker: WorkerProc, rds: redis.Redis) -> None:
    """Last test of the module: it kills the shared worker."""
    key = f"sglang:worker:{main_worker.worker_id}"
    assert rds.exists(key)
    main_worker.kill()
    killed_at = time.monotonic()
    assert rds.exists(key)  # still there: only the TTL removes it
    assert wait_until(lambda: not rds.exists(key), TTL_S + 2.0)
    assert time.monotonic() - killed_at <= TTL_S + 0.5

    async def go(c: WorkerClient) -> bool:
        with pytest.raises(WorkerUnavailable, match="UNAVAILABLE"):
            await c.get_load()
        with pytest.raises(WorkerUnavailable):
            await collect(c, GenerateInput(request_id="dead", input_ids=[5]))
        return await c.health()

    assert run(go, main_worker.addr) is False


def test_cli_help_and_rejected_settings() -> None:
    import subprocess
    import sys

    from tests.helpers.procs import worker_env

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sglang_worker", *args], capture_output=True, text=True,
                              timeout=30, env=worker_env(), stdin=subprocess.DEVNULL)

    helped = cli("--help")
    assert helped.returncode == 0
    for flag in ("--role", "--port", "--redis-url", "--model-path", "--load-format", "--dtype", "--page-size",
                 "--max-total-tokens", "--chunked-prefill-size", "--max-running-requests", "--context-length",
                 "--device", "--metrics-port", "--drain-timeout-s", "--heartbeat-ttl-s", "--worker-id",
                 "--kv-transfer-timeout-s", "--kv-transfer-redis-url"):
        assert flag in helped.stdout, flag
    assert "--disaggregation-mode" not in helped.stdout  # --role decides it
    role = cli("--role", "prefill")  # PD roles meet their peers through Redis
    assert role.returncode == 2 and "role='prefill' needs redis_url" in role.stderr, role.stderr
    ttl = cli("--heartbeat-interval-s", "2", "--heartbeat-ttl-s", "1")
    assert ttl.returncode == 2 and "heartbeat_ttl_s" in ttl.stderr
