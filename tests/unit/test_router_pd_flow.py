"""The router's PD flow against scripted fake workers (no processes): pairing with one bootstrap
room, decode picked by load, failures of either half aborting the other and retrying once before
the first token, the prefill's reason reaching the client, the first-token deadline, pd_mode off."""

from __future__ import annotations

import asyncio
import contextlib
import time
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
from sglang_router.models import ModelState
from sglang_router.policies.round_robin import RoundRobinPolicy
from sglang_router.request_flow import PreparedRequest, RequestFlow, SampleResult, collect

from tests.helpers.tokenizers import make_tiny_tokenizer

pytestmark = pytest.mark.unit

Script = Callable[[GenerateInput], AsyncIterator[GenerateEvent]]


class FakeClient:
    """A WorkerClient double with the three streaming RPCs and Abort."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.calls: list[tuple[str, GenerateInput]] = []
        self.aborted: list[str] = []
        self.cancelled: list[str] = []
        self.scripts: dict[str, Script] = {}

    async def _run(self, rpc: str, inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        self.calls.append((rpc, inp))
        finished = False
        try:
            async for e in self.scripts[rpc](inp):
                finished = e.kind != "chunk"  # as WorkerClient: the call is over with its result
                yield e
            finished = True
        finally:
            if not finished:
                self.cancelled.append(inp.request_id)

    def generate(self, inp: GenerateInput, *, timeout_s: float | None = None) -> AsyncIterator[GenerateEvent]:
        return self._run("generate", inp)

    def prefill(self, inp: GenerateInput, *, timeout_s: float | None = None) -> AsyncIterator[GenerateEvent]:
        return self._run("prefill", inp)

    def decode(self, inp: GenerateInput, *, timeout_s: float | None = None) -> AsyncIterator[GenerateEvent]:
        return self._run("decode", inp)

    async def abort(self, request_id: str, *, timeout_s: float | None = None) -> bool:
        self.aborted.append(request_id)
        return True

    async def close(self) -> None:
        return None


class Registry:
    def __init__(self, records: list[WorkerRecord]) -> None:
        self.records = records

    async def list_workers(self, include_draining: bool = False) -> list[WorkerRecord]:
        return list(self.records)


def rec(wid: str, role: str, running: int = 0) -> WorkerRecord:
    return WorkerRecord(worker_id=wid, grpc_addr=f"{wid}:1", role=role, model="tiny", context_length=64,
                        heartbeat_at=1.0, load=WorkerLoad(num_running_reqs=running))


def ev(ids: list[int], final: bool = False, reason: dict[str, Any] | None = None) -> GenerateEvent:
    if final:
        return GenerateEvent("complete", token_ids=ids, finish_reason=reason or {"type": "length"}, prompt_tokens=3)
    return GenerateEvent("chunk", token_ids=ids, prompt_tokens=3)


async def ok_prefill(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
    yield ev([40], final=True)


async def ok_decode(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
    await asyncio.sleep(0.01)  # after the prefill's KV arrived
    yield ev([40])
    yield ev([41, 42], final=True)


async def hang(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
    await asyncio.sleep(3600)
    yield ev([])  # pragma: no cover


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=320))


def make_flow(tok: Tokenizer, records: list[WorkerRecord], **settings: Any) -> tuple[RequestFlow, ModelState, dict[str, FakeClient]]:
    s = RouterSettings(**settings)
    clients: dict[str, FakeClient] = {}

    def factory(addr: str) -> FakeClient:
        clients[addr.split(":")[0]] = FakeClient(addr)
        for rpc, script in (("prefill", ok_prefill), ("decode", ok_decode), ("generate", ok_decode)):
            clients[addr.split(":")[0]].scripts[rpc] = script
        return clients[addr.split(":")[0]]

    disc = Discovery(Registry(records), s, RouterMetrics(CollectorRegistry()), client_factory=factory)  # type: ignore[arg-type]
    disc.apply(records)
    flow = RequestFlow(s, disc, RoundRobinPolicy(), disc.metrics)  # type: ignore[arg-type]
    return flow, ModelState("tiny", tok, context_length=64, vocab_size=tok.vocab_size, model_path=""), clients


async def run(flow: RequestFlow, req: PreparedRequest) -> list[SampleResult]:
    async with contextlib.aclosing(flow.stream(req)) as updates:
        return await collect(updates, len(req.samples))


def failures(flow: RequestFlow, stage: str) -> float:
    return flow.metrics.pd_failures_total.labels(stage)._value.get()  # type: ignore[no-any-return]


def test_pairs_prefill_and_least_loaded_decode_with_one_room(tokenizer: Tokenizer) -> None:
    async def body() -> None:
        records = [rec("p1", "prefill"), rec("d1", "decode", running=5), rec("d2", "decode", running=1),
                   rec("u1", "unified")]
        flow, model, clients = make_flow(tokenizer, records)
        (r,) = await run(flow, flow.prepare(model, [[5, 6, 7]], {"max_new_tokens": 3, "temperature": 0}))
        assert r.output_ids == [40, 41, 42] and r.worker_id == "d2" and r.finish_reason == {"type": "length"}
        (prpc, pin), = clients["p1"].calls
        (drpc, din), = clients["d2"].calls
        assert (prpc, drpc) == ("prefill", "decode")
        assert pin.bootstrap_room == din.bootstrap_room and 0 <= din.bootstrap_room < 2**63
        assert not pin.stream and din.stream and pin.request_id == din.request_id
        assert pin.input_ids == din.input_ids == [5, 6, 7] and pin.sampling_params == din.sampling_params
        assert clients["u1"].calls == [] and clients["d1"].calls == []
        assert clients["p1"].cancelled == [] and clients["p1"].aborted == []  # it finished by itself
        # pd_mode off: the unified worker only
        flow, model, clients = make_flow(tokenizer, records, pd_mode="off")
        await run(flow, flow.prepare(model, [[5, 6, 7]], {"max_new_tokens": 3}))
        assert [c[0] for c in clients["u1"].calls] == ["generate"] and clients["p1"].calls == []

    asyncio.run(body())


def test_prefill_death_aborts_decode_and_retries_once_on_another_prefill(tokenizer: Tokenizer) -> None:
    async def dies(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        await asyncio.sleep(0.05)
        raise WorkerUnavailable("Prefill failed: UNAVAILABLE connection reset")
        yield ev([])  # pragma: no cover

    async def decode_waits_for_kv(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        if inp.request_id.endswith("-r1"):
            async for e in ok_decode(inp):
                yield e
            return
        await asyncio.sleep(3600)  # the KV never comes
        yield ev([])  # pragma: no cover

    async def body() -> None:
        flow, model, clients = make_flow(tokenizer, [rec("p1", "prefill"), rec("p2", "prefill"), rec("d1", "decode")])
        clients["p1"].scripts["prefill"] = dies
        clients["d1"].scripts["decode"] = decode_waits_for_kv
        req = flow.prepare(model, [[5, 6, 7]], {"max_new_tokens": 3})
        (r,) = await run(flow, req)
        assert r.output_ids == [40, 41, 42]
        first, second = (inp for _, inp in clients["d1"].calls)
        assert clients["d1"].aborted == [first.request_id] and clients["d1"].cancelled == [first.request_id]
        assert second.request_id == first.request_id + "-r1" and second.bootstrap_room != first.bootstrap_room
        assert [inp.request_id for _, inp in clients["p2"].calls] == [second.request_id]
        assert not flow.discovery.workers["p1"].routable  # marked failed
        assert failures(flow, "prefill") == 1

    asyncio.run(body())


def test_prefill_death_without_another_prefill_is_a_clean_503_within_a_second(tokenizer: Tokenizer) -> None:
    async def dies(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        await asyncio.sleep(0.05)
        raise WorkerUnavailable("Prefill failed: UNAVAILABLE")
        yield ev([])  # pragma: no cover

    async def body() -> None:
        flow, model, clients = make_flow(tokenizer, [rec("p1", "prefill"), rec("d1", "decode")])
        clients["p1"].scripts["prefill"] = dies
        clients["d1"].scripts["decode"] = hang
        t0 = time.monotonic()
        with pytest.raises(RouterError) as info:
            await run(flow, flow.prepare(model, [[5, 6, 7]], {"max_new_tokens": 3}))
        assert time.monotonic() - t0 < 1.0
        assert info.value.status == 503 and info.value.code == "worker_unavailable"
        assert "prefill worker p1 became unavailable" in info.value.message
        rid = clients["d1"].calls[0][1].request_id
        assert clients["d1"].aborted == [rid] and clients["d1"].cancelled == [rid]

    asyncio.run(body())


def test_the_prefill_reason_reaches_the_client(tokenizer: Tokenizer) -> None:
    msg = "KV transfer failed: incompatible KV layout (room 1, decode agent d1): page_size: prefill 16 != decode 1"

    async def refused(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        await asyncio.sleep(0.02)
        yield ev([], final=True, reason={"type": "abort", "message": msg})

    async def aborted(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        yield ev([], final=True, reason={"type": "abort", "message": "KV transfer failed: prefill side gave up"})

    async def body() -> None:
        for decode_script in (hang, aborted):  # the decode side learns it later, or first
            flow, model, clients = make_flow(tokenizer, [rec("p1", "prefill"), rec("d1", "decode")])
            clients["p1"].scripts["prefill"] = refused
            clients["d1"].scripts["decode"] = decode_script
            with pytest.raises(RouterError) as info:
                await run(flow, flow.prepare(model, [[5, 6, 7]], {"max_new_tokens": 3}))
            assert info.value.status == 503 and info.value.code == "kv_transfer_failed"
            assert "page_size: prefill 16 != decode 1" in info.value.message

    asyncio.run(body())


def test_decode_death_cancels_prefill_and_retries_on_another_decode(tokenizer: Tokenizer) -> None:
    async def dies(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        await asyncio.sleep(0.02)
        raise WorkerUnavailable("Decode failed: UNAVAILABLE")
        yield ev([])  # pragma: no cover

    async def body() -> None:
        flow, model, clients = make_flow(tokenizer, [rec("p1", "prefill"), rec("d1", "decode"), rec("d2", "decode", 3)])
        clients["d1"].scripts["decode"] = dies
        clients["p1"].scripts["prefill"] = hang  # still writing when the decode worker dies
        calls = {"n": 0}

        async def prefill(inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
            calls["n"] += 1
            script = hang if calls["n"] == 1 else ok_prefill
            async for e in script(inp):
                yield e

        clients["p1"].scripts["prefill"] = prefill
        (r,) = await run(flow, flow.prepare(model, [[5, 6, 7]], {"max_new_tokens": 3}))
        assert r.output_ids == [40, 41, 42] and r.worker_id == "d2"
        first = clients["p1"].calls[0][1].request_id
        assert clients["p1"].cancelled == [first] and clients["p1"].aborted == [first]
        assert failures(flow, "decode") == 1

    asyncio.run(body())


def test_no_first_token_within_pd_timeout_aborts_both(tokenizer: Tokenizer) -> None:
    async def body() -> None:
        flow, model, clients = make_flow(tokenizer, [rec("p1", "prefill"), rec("d1", "decode")], pd_timeout_s=0.3)
        clients["p1"].scripts["prefill"] = hang
        clients["d1"].scripts["decode"] = hang
        t0 = time.monotonic()
        with pytest.raises(RouterError) as info:
            await run(flow, flow.prepare(model, [[5, 6, 7]], {"max_new_tokens": 3}))
        assert 0.3 <= time.monotonic() - t0 < 1.5
        assert info.value.status == 504 and "0.3 s" in info.value.message
        rid = clients["d1"].calls[0][1].request_id
        assert clients["d1"].aborted == [rid] and clients["p1"].cancelled == [rid]

    asyncio.run(body())


def test_no_decode_worker_means_unified_routing(tokenizer: Tokenizer) -> None:
    async def body() -> None:
        flow, model, clients = make_flow(tokenizer, [rec("p1", "prefill"), rec("u1", "unified")])
        await run(flow, flow.prepare(model, [[5, 6, 7]], {"max_new_tokens": 3}))
        assert [c[0] for c in clients["u1"].calls] == ["generate"] and clients["p1"].calls == []
        flow, model, clients = make_flow(tokenizer, [rec("p1", "prefill")])
        with pytest.raises(RouterError) as info:
            await run(flow, flow.prepare(model, [[5, 6, 7]], {"max_new_tokens": 3}))
        assert info.value.status == 503 and "no worker is available" in info.value.message

    asyncio.run(body())
