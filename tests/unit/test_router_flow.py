"""Router discovery and request flow against scripted fake workers (no processes): joins, leaves,
draining, failure marks, retry before the first token, errors after it, stop strings, n fan-out,
capacity 503s and cancellation reaching the worker stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sglang.cluster.registry import WorkerLoad, WorkerRecord
from sglang.engine.tokenizer import Tokenizer
from sglang.observability.metrics import RouterMetrics
from sglang.settings.router import RouterSettings
from sglang.transport.types import GenerateEvent, GenerateInput, WorkerUnavailable
from sglang_router.discovery import Discovery
from sglang_router.errors import RouterError
from sglang_router.models import ModelCatalog, ModelState
from sglang_router.policies.round_robin import RoundRobinPolicy
from sglang_router.request_flow import PreparedRequest, RequestFlow, SampleResult, collect

from tests.helpers.tokenizers import make_tiny_tokenizer

pytestmark = pytest.mark.unit

Script = Callable[[GenerateInput], AsyncIterator[GenerateEvent]]


class FakeClient:
    """A WorkerClient double: ``script`` produces the events of each generate call."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.closed = False
        self.calls: list[GenerateInput] = []
        self.cancelled = 0
        self.script: Script | None = None
        self.model_info: dict[str, Any] | None = None

    async def generate(self, inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        self.calls.append(inp)
        assert self.script is not None
        finished = False
        try:
            async for ev in self.script(inp):
                yield ev
            finished = True
        finally:
            if not finished:
                self.cancelled += 1

    async def get_model_info(self) -> dict[str, Any]:
        if self.model_info is None:
            raise WorkerUnavailable(f"{self.addr} is gone")
        return self.model_info

    async def close(self) -> None:
        self.closed = True


class Registry:
    """Stands in for WorkerRegistry (only ``list_workers`` is used)."""

    def __init__(self) -> None:
        self.records: list[WorkerRecord] = []

    async def list_workers(self, include_draining: bool = False) -> list[WorkerRecord]:
        return list(self.records)


def rec(wid: str, addr: str = "", hb: float = 1.0, draining: bool = False, waiting: int = 0) -> WorkerRecord:
    return WorkerRecord(
        worker_id=wid, grpc_addr=addr or f"{wid}:1", model="tiny", context_length=64, draining=draining,
        heartbeat_at=hb, load=WorkerLoad(num_waiting_reqs=waiting),
    )


def tokens(ids: list[int], final: bool = False, reason: str = "length") -> GenerateEvent:
    if final:
        return GenerateEvent("complete", token_ids=ids, finish_reason={"type": reason}, prompt_tokens=3, completion_tokens=0)
    return GenerateEvent("chunk", token_ids=ids, prompt_tokens=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=320))


def make_flow(tok: Tokenizer, records: list[WorkerRecord], **settings: Any) -> tuple[RequestFlow, Discovery, ModelState, dict[str, FakeClient]]:
    s = RouterSettings(**settings)
    clients: dict[str, FakeClient] = {}

    def factory(addr: str) -> FakeClient:
        clients[addr.split(":")[0]] = FakeClient(addr)
        return clients[addr.split(":")[0]]

    registry = Registry()
    registry.records = records
    disc = Discovery(registry, s, RouterMetrics(CollectorRegistry()), client_factory=factory)  # type: ignore[arg-type]
    disc.apply(records)
    flow = RequestFlow(s, disc, RoundRobinPolicy(), disc.metrics)  # type: ignore[arg-type]
    model = ModelState("tiny", tok, context_length=64, vocab_size=tok.vocab_size, model_path="")
    return flow, disc, model, clients


async def run_flow(flow: RequestFlow, req: PreparedRequest) -> list[SampleResult]:
    async with contextlib.aclosing(flow.stream(req)) as updates:
        return await collect(updates, len(req.samples))


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def test_discovery_tracks_joins_leaves_draining_and_failures(tokenizer: Tokenizer) -> None:
    async def body() -> None:
        flow, disc, _, clients = make_flow(tokenizer, [rec("w1"), rec("w2")])
        removed: list[str] = []
        disc.on_removed.append(removed.append)
        assert [h.worker_id for h in disc.routable()] == ["w1", "w2"]
        disc.apply([rec("w1"), rec("w2", draining=True)])  # draining: kept (its requests finish), not routed
        assert [h.worker_id for h in disc.routable()] == ["w1"] and not clients["w2"].closed
        disc.mark_failed("w1")
        assert disc.routable() == [] and disc.num_routable == 0
        disc.apply([rec("w1", hb=1.0), rec("w2", hb=1.0)])  # same heartbeat: w1 still failed; w2 serves again
        assert [h.worker_id for h in disc.routable()] == ["w2"]
        disc.apply([rec("w1", hb=2e10), rec("w2", hb=2e10)])  # a heartbeat after the failure clears it
        assert [h.worker_id for h in disc.routable()] == ["w1", "w2"]
        h1 = disc.workers["w1"]
        with disc.track(h1):
            disc.apply([rec("w2", hb=2e10)])  # w1's key expired
            assert removed == ["w1"] and [h.worker_id for h in disc.routable()] == ["w2"]
            await disc._close_idle_retired()
            assert not clients["w1"].closed  # a request still runs on it
        await disc._close_idle_retired()
        assert clients["w1"].closed
        disc.apply([rec("w2", addr="w2b:1", hb=2e10)])  # same id, new address: a new client
        await disc._close_idle_retired()
        assert clients["w2"].closed and disc.workers["w2"].client is clients["w2b"]
        await disc.stop()
        assert clients["w2b"].closed

    asyncio.run(body())


# ---------------------------------------------------------------------------------------------
# Request flow
# ---------------------------------------------------------------------------------------------


def test_stop_string_trims_text_and_cancels_the_worker_stream(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello, world! The quick brown fox")

    async def script(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        for t in ids:
            yield tokens([t])
        yield tokens([], final=True)

    async def body() -> None:
        flow, _, model, clients = make_flow(tokenizer, [rec("w1")])
        clients["w1"].script = script
        req = flow.prepare(model, [[5, 6, 7]], {"stop": ["quick"], "max_new_tokens": 40})
        (r,) = await run_flow(flow, req)
        assert r.text == "Hello, world! The "
        assert r.finish_reason == {"type": "stop", "matched": "quick"}
        assert clients["w1"].cancelled == 1  # the router stopped reading: the worker call is cancelled
        wire = clients["w1"].calls[0].sampling_params
        assert wire["stop"] == ["quick"] and wire["max_new_tokens"] == 40 and "spaces_between_special_tokens" not in wire

    asyncio.run(body())


def test_n_fans_out_with_seed_plus_index_and_streams_every_sample(tokenizer: Tokenizer) -> None:
    async def script(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        yield tokens([100 + inp.sampling_params["seed"]])
        yield tokens([200], final=True)

    async def body() -> None:
        flow, _, model, clients = make_flow(tokenizer, [rec("w1"), rec("w2")])
        for c in clients.values():
            c.script = script
        req = flow.prepare(model, [[5, 6], [7, 8, 9]], {"n": 2, "seed": 10, "max_new_tokens": 4})
        results = await run_flow(flow, req)
        assert [r.output_ids for r in results] == [[110, 200], [111, 200], [110, 200], [111, 200]]
        assert [s.prompt_index for s in req.samples] == [0, 0, 1, 1]
        assert sorted(len(c.calls) for c in clients.values()) == [2, 2]  # round robin over 2 workers
        assert all(c.sampling_params["n"] == 1 for cl in clients.values() for c in cl.calls)

    asyncio.run(body())


def test_unavailable_before_the_first_token_retries_on_another_worker(tokenizer: Tokenizer) -> None:
    async def dead(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        raise WorkerUnavailable("connection refused")
        yield tokens([])  # pragma: no cover

    async def ok(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        yield tokens([70, 71], final=True)

    async def body() -> None:
        flow, disc, model, clients = make_flow(tokenizer, [rec("w1"), rec("w2")])
        clients["w1"].script, clients["w2"].script = dead, ok
        (r,) = await run_flow(flow, flow.prepare(model, [[5]], {}))
        assert r.output_ids == [70, 71] and r.worker_id == "w2"
        assert disc.workers["w1"].failed and [h.worker_id for h in disc.routable()] == ["w2"]
        flow.settings.max_retries = 0
        disc.workers["w1"].failed_at = None
        clients["w2"].script = dead
        with pytest.raises(RouterError) as e:
            await run_flow(flow, flow.prepare(model, [[5]], {}))
        assert e.value.status == 503 and e.value.retry_after == 1

    asyncio.run(body())


def test_failure_after_tokens_ends_with_a_clean_503_and_no_retry(tokenizer: Tokenizer) -> None:
    async def dies(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        yield tokens([70])
        raise WorkerUnavailable("stream broke")

    async def body() -> None:
        flow, _, model, clients = make_flow(tokenizer, [rec("w1"), rec("w2")])
        clients["w1"].script = clients["w2"].script = dies
        got = []
        with pytest.raises(RouterError) as e:
            async with contextlib.aclosing(flow.stream(flow.prepare(model, [[5]], {}))) as updates:
                async for u in updates:
                    got.append(u.token_ids)
        assert got == [[70]] and e.value.status == 503 and "unavailable" in e.value.message
        assert len(clients["w1"].calls) + len(clients["w2"].calls) == 1

    asyncio.run(body())


def test_worker_error_events_keep_their_status_and_param(tokenizer: Tokenizer) -> None:
    async def bad(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        yield GenerateEvent("error", error_code=400, error_message="regex is invalid", error_param="regex")

    async def body() -> None:
        flow, _, model, clients = make_flow(tokenizer, [rec("w1")])
        clients["w1"].script = bad
        with pytest.raises(RouterError) as e:
            await run_flow(flow, flow.prepare(model, [[5]], {}))
        assert (e.value.status, e.value.param, e.value.message) == (400, "regex", "regex is invalid")

    asyncio.run(body())


def test_validation_names_the_field_and_capacity_gives_503(tokenizer: Tokenizer) -> None:
    async def body() -> None:
        flow, disc, model, _ = make_flow(tokenizer, [rec("w1", waiting=5)], max_waiting_per_worker=5)
        names = {"max_new_tokens": "max_tokens"}
        cases = [
            ([list(range(5, 70))], {}, "prompt", "context length is 64"),
            ([[5, 999]], {}, "prompt", "not a token id"),
            ([[5]], {"max_new_tokens": -1}, "max_tokens", "max_tokens must be >= 0"),
            ([[5]], {"temperature": "hot"}, "temperature", "temperature must be a number"),
            ([[5]], {"bogus": 1}, "bogus", "unknown sampling parameter 'bogus'"),
        ]
        for prompts, params, param, text in cases:
            with pytest.raises(RouterError) as e:
                flow.prepare(model, prompts, params, param_names=names)
            assert (e.value.status, e.value.param) == (400, param) and text in e.value.message
        req = flow.prepare(model, [[5] * 60], {"max_new_tokens": 100, "min_new_tokens": 50})
        assert (req.samples[0].params.max_new_tokens, req.samples[0].params.min_new_tokens) == (4, 4)
        with pytest.raises(RouterError) as e:  # the only worker reports a full queue
            await run_flow(flow, flow.prepare(model, [[5]], {}))
        assert (e.value.status, e.value.code, e.value.retry_after) == (503, "overloaded", 1)
        disc.apply([])
        with pytest.raises(RouterError) as e:
            await run_flow(flow, flow.prepare(model, [[5]], {}))
        assert e.value.status == 503 and "no worker" in e.value.message

    asyncio.run(body())


def test_leaving_the_stream_cancels_every_worker_call(tokenizer: Tokenizer) -> None:
    started = asyncio.Event

    async def body() -> None:
        flow, disc, model, clients = make_flow(tokenizer, [rec("w1"), rec("w2")])
        first = started()

        async def slow(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
            yield tokens([70])
            first.set()
            await asyncio.sleep(30)
            yield tokens([71], final=True)

        clients["w1"].script = clients["w2"].script = slow
        req = flow.prepare(model, [[5]], {"n": 2})
        task = asyncio.create_task(run_flow(flow, req))
        await asyncio.wait_for(first.wait(), 5)
        await asyncio.sleep(0.05)
        task.cancel()  # what aiohttp does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        assert clients["w1"].cancelled == clients["w2"].cancelled == 1
        assert flow.inflight == 0 and all(h.inflight == 0 for h in disc.workers.values())

    asyncio.run(body())


def test_request_timeout_is_a_504(tokenizer: Tokenizer) -> None:
    async def hang(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        await asyncio.sleep(30)
        yield tokens([1], final=True)

    async def body() -> None:
        flow, _, model, clients = make_flow(tokenizer, [rec("w1")], request_timeout_s=0.2)
        clients["w1"].script = hang
        with pytest.raises(RouterError) as e:
            await asyncio.wait_for(run_flow(flow, flow.prepare(model, [[5]], {})), 5)
        assert e.value.status == 504 and clients["w1"].cancelled == 1

    asyncio.run(body())


def test_model_catalog_loads_from_a_worker_and_answers_400_or_503(tokenizer: Tokenizer) -> None:
    async def body() -> None:
        _, disc, _, clients = make_flow(tokenizer, [])
        catalog = ModelCatalog(disc.settings, disc)
        with pytest.raises(RouterError) as e:  # nothing served yet: transient
            await catalog.get(None)
        assert (e.value.status, e.value.code, e.value.retry_after) == (503, "no_workers", 1)
        disc.apply([rec("w1"), rec("w2")])
        clients["w2"].model_info = {"model_path": tokenizer.path, "context_length": 64, "vocab_size": 320}
        assert clients["w1"].model_info is None  # w1 cannot answer GetModelInfo
        with pytest.raises(RouterError) as e:
            await catalog.get("tiny")  # the load started when w1 joined, and failed
        assert e.value.status == 503 and e.value.code == "model_loading"
        assert disc.workers["w1"].failed  # so the next try asks w2
        state = await catalog.get("tiny")
        assert (state.name, state.context_length, state.vocab_size, state.tokenizer.path) == ("tiny", 64, 320, tokenizer.path)
        assert catalog.ready and await catalog.get(None) is state
        with pytest.raises(RouterError) as e:
            await catalog.get("other")
        assert (e.value.status, e.value.param, e.value.code) == (400, "model", "model_not_found")
        await catalog.close()

    asyncio.run(body())
