"""Decode-side page quarantine (PD): pages of a room that ends without its last chunk, after a
prefill agent claimed it, stay out of the free list until no late NIXL write can land in them.

A prefill ``Engine`` and a decode ``Engine`` over real NIXL (UCX on DRAM, ``UCX_NET_DEVICES=lo``)
and a real redis-server, page_size 16, 64 pages on the decode side:

- the client aborts the decode half while the prefill sleeps between chunks (test hook): the
  room's exact pages are quarantined (counted in ``num_used_pages``, not in the free list), a later
  request gets exactly the other pages, and the pages come back when the prefill wakes, reads the
  abort and sends ``released``;
- a "prefill" (a bare NIXL sender) claims a room, writes a chunk and then never answers: the
  quarantined pages come back within 5 s of its heartbeat going away, or, while it stays alive,
  after the bounded quarantine timeout.

After every test both engines pass ``check_integrity()`` with 0 pages in use.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("nixl._api")
from sglang.engine.engine import Engine  # noqa: E402
from sglang.engine.memory import KVPool  # noqa: E402
from sglang.kv_transfer import create_sender  # noqa: E402

from tests.helpers.redis_server import start_redis  # noqa: E402
from tests.helpers.tiny_models import make_tiny_model  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

VOCAB = 256
PAGE = 16
CHUNK = 32
COMMON = {"skip_tokenizer_init": True, "device": "cpu", "dtype": "float32", "max_total_tokens": 64 * PAGE,
          "chunked_prefill_size": CHUNK, "max_running_requests": 8, "page_size": PAGE}
TIMEOUT_S = 10.0
PARAMS = {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True}


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def _room() -> int:
    return random.getrandbits(63)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    old = os.environ.get("UCX_NET_DEVICES")
    os.environ["UCX_NET_DEVICES"] = "lo"
    url, stop = start_redis()
    yield url
    stop()
    if old is None:
        os.environ.pop("UCX_NET_DEVICES", None)
    else:
        os.environ["UCX_NET_DEVICES"] = old


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[Engine, Engine]]:
    model = str(make_tiny_model("llama", tmp_path_factory.mktemp("pdq-llama"), vocab_size=VOCAB, seed=3))
    pd: dict[str, Any] = {"kv_transfer_redis_url": redis_url, "kv_transfer_timeout_s": TIMEOUT_S}
    tag = uuid.uuid4().hex[:6]
    prefill = Engine(model_path=model, **COMMON, **pd, disaggregation_mode="prefill",
                     kv_transfer_agent_name=f"pdq-prefill-{tag}")
    decode = Engine(model_path=model, **COMMON, **pd, disaggregation_mode="decode",
                    kv_transfer_agent_name=f"pdq-decode-{tag}")
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


def _pages_back(engine: Engine, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        st = engine.get_stats()
        if st["num_used_pages"] == 0 and st["num_decode_transfer_queue_reqs"] == 0:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(autouse=True)
def _no_leaks(pair: tuple[Engine, Engine]) -> Iterator[None]:
    yield
    for e in pair:
        assert _pages_back(e, within_s=10.0), e.get_stats()
        e.check_integrity()
        assert e._loop.call(lambda s: s.kv.quarantined) == 0


def _on(engine: Engine, fn: Callable[[Any], Any]) -> Any:
    """Read scheduler state on its own thread (each call also runs one scheduler step)."""
    return engine._loop.call(fn)


def _free(engine: Engine) -> set[int]:
    return set(_on(engine, lambda s: set(s.runner.allocator._free_set)))


async def _until(cond: Callable[[], Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _claimed(decode: Engine, room: int) -> bool:
    return bool(_on(decode, lambda s: room in s.pd.receiver._rooms and s.pd.receiver._rooms[room].claimed))


def test_decode_abort_mid_transfer_quarantines_pages_until_the_prefill_acks(pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pair
    assert prefill.flush_cache() and decode.flush_cache()
    total = decode.get_stats()["num_total_pages"]
    assert total == 64
    ids = _tokens(8 * CHUNK, 77)  # 16 pages; nothing cached: every chunk is computed and written
    room = _room()
    seen: dict[str, Any] = {}

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        d = asyncio.ensure_future(decode.async_generate(
            input_ids=ids, sampling_params=PARAMS, bootstrap_room=room, rid=f"d-{room}"))
        await _until(lambda: decode.get_stats()["num_decode_transfer_queue_reqs"] == 1, 10)
        seen["pages"] = _on(decode, lambda s: list(s.pd.transfer[room].pages))
        p = asyncio.ensure_future(prefill.async_generate(
            input_ids=ids, sampling_params=PARAMS, bootstrap_room=room, rid=f"p-{room}"))
        await _until(lambda: _claimed(decode, room), 10)  # the prefill wrote chunk 0 and now sleeps
        decode.abort(f"d-{room}")
        dec = await asyncio.wait_for(d, 10)
        seen["aborted_at"] = time.monotonic()
        # The prefill is still asleep: nobody acknowledged, so the room's pages stay quarantined.
        seen["quarantine"] = _on(decode, lambda s: {r: list(p) for r, p in s.pd.quarantine.items()})
        seen["used"] = decode.get_stats()["num_used_pages"]
        seen["free"] = _free(decode)
        # A later request (nobody prefills it) may take every free page: it gets exactly the others.
        later = _room()
        n_free = len(seen["free"])
        fut = asyncio.ensure_future(decode.async_generate(
            input_ids=_tokens(n_free * PAGE, 78), sampling_params=PARAMS, bootstrap_room=later, rid=f"l-{later}"))
        await _until(lambda: _on(decode, lambda s: later in s.pd.transfer), 10)
        seen["later_pages"] = _on(decode, lambda s: list(s.pd.transfer[later].pages))
        decode.abort(f"l-{later}")  # never claimed: its pages are free again at once
        seen["later_out"] = await asyncio.wait_for(fut, 10)
        seen["free_after_later"] = _free(decode)
        seen["still_quarantined"] = _on(decode, lambda s: set(s.pd.quarantine))
        await _until(lambda: not _on(decode, lambda s: s.pd.quarantine), 15)
        seen["released_after_s"] = time.monotonic() - seen["aborted_at"]
        pre = await asyncio.wait_for(p, 10)
        return pre, dec

    pd = prefill.scheduler.pd
    pd.chunk_delay_s = 3.0  # type: ignore[union-attr]
    try:
        pre, dec = asyncio.run(go())
    finally:
        pd.chunk_delay_s = 0.0  # type: ignore[union-attr]

    pages = seen["pages"]
    assert pages == list(range(1, 17))  # a fresh pool hands out pages in order
    assert dec["meta_info"]["finish_reason"]["type"] == "abort" and dec["output_ids"] == []
    assert seen["quarantine"] == {room: pages}
    assert seen["used"] == 16
    assert seen["free"] == set(range(1, total + 1)) - set(pages)
    assert sorted(seen["later_pages"]) == sorted(seen["free"])  # none of the quarantined pages
    assert seen["later_out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert seen["free_after_later"] == seen["free"]
    assert seen["still_quarantined"] == {room}  # the prefill (asleep, alive) has not acknowledged yet
    # Released by the prefill's acknowledgement: once it woke (3 s hook), long before the
    # quarantine timeout (2 x 10 s); its agent is alive throughout.
    assert seen["released_after_s"] < 10.0, seen
    assert set(pages) <= _free(decode)
    assert pre["meta_info"]["finish_reason"]["type"] == "abort"
    assert "decode side gave up the room" in pre["meta_info"]["finish_reason"]["message"]


@pytest.mark.parametrize("ending", ["prefill_gone", "quarantine_timeout"])
def test_unanswered_quarantine_ends_when_the_prefill_dies_or_times_out(
    pair: tuple[Engine, Engine], redis_url: str, ending: str
) -> None:
    """A bare sender claims the room, writes chunk 0 and then never polls (never acknowledges)."""
    _, decode = pair
    assert decode.flush_cache()
    receiver = decode.scheduler.pd.receiver  # type: ignore[union-attr]
    layout = receiver.kv.layout  # type: ignore[attr-defined]
    pool = KVPool(8, layout.page_size, layout.num_layers, layout.num_kv_heads, layout.head_dim,
                  getattr(torch, layout.dtype), "cpu")
    tx = create_sender("nixl", kv_pool=pool, layout=layout, agent_name=f"pdq-bare-{uuid.uuid4().hex[:6]}",
                       redis_url=redis_url, timeout_s=TIMEOUT_S)
    room = _room()
    ids = _tokens(4 * PAGE, 91)
    seen: dict[str, Any] = {}

    async def go() -> dict[str, Any]:
        d = asyncio.ensure_future(decode.async_generate(
            input_ids=ids, sampling_params=PARAMS, bootstrap_room=room, rid=f"d-{room}"))
        await _until(lambda: _on(decode, lambda s: room in s.pd.transfer), 10)
        pages = seen["pages"] = _on(decode, lambda s: list(s.pd.transfer[room].pages))
        await _until(lambda: tx.dest(room) is not None, 10)
        tx.send(room, [1], [pages[0]], 0, last=False)
        await _until(lambda: _claimed(decode, room), 10)
        decode.abort(f"d-{room}")
        t_abort = time.monotonic()
        if ending == "quarantine_timeout":
            receiver.quarantine_s = 2.5  # type: ignore[attr-defined]
        out = await asyncio.wait_for(d, 10)
        await asyncio.sleep(1.0)  # the sender is alive and silent: nothing is released
        seen["quarantine"] = _on(decode, lambda s: {r: list(p) for r, p in s.pd.quarantine.items()})
        seen["free"] = _free(decode)
        t0 = time.monotonic()
        if ending == "prefill_gone":
            tx.kv.heartbeat.stop()  # type: ignore[attr-defined]  # as if killed: its record is gone
        await _until(lambda: not _on(decode, lambda s: s.pd.quarantine), 10)
        seen["released_after_s"] = time.monotonic() - t0
        seen["since_abort_s"] = time.monotonic() - t_abort
        return out

    try:
        out = asyncio.run(go())
    finally:
        receiver.quarantine_s = 2 * TIMEOUT_S  # type: ignore[attr-defined]
        tx.close()
    pages = seen["pages"]
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert seen["quarantine"] == {room: pages}
    assert not set(pages) & seen["free"]
    assert seen["released_after_s"] < 5.0, seen
    if ending == "quarantine_timeout":
        assert seen["since_abort_s"] >= 2.5, seen
    assert set(pages) <= _free(decode)
