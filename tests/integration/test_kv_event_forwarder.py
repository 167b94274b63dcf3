"""sglang.cluster.kv_events: the stream entry codec and the forwarder (engine thread -> Redis)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from sglang.cluster.kv_events import (
    CLEARED_SEQ,
    RedisKVEventForwarder,
    decode_entry,
    encode_batch,
    stream_key,
)
from sglang.engine.prefix_cache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    InProcessPublisher,
    KVEventBatch,
    hash_pages,
)

from tests.helpers.redis_server import start_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url, stop = start_redis()
    try:
        yield url
    finally:
        stop()


def stored(tokens: list[int]) -> BlockStored:
    return BlockStored(block_hashes=hash_pages(tokens, 2), parent_block_hash=None, token_ids=tokens, block_size=2)


def test_codec_round_trip_with_bytes_fields() -> None:
    big = 2**64 - 1  # hashes are unsigned 64-bit
    batch = KVEventBatch(seq=7, ts=1234.5, events=[
        stored([1, 2, 3, 4]),
        BlockStored(block_hashes=[big], parent_block_hash=big - 1, token_ids=[5, 6], block_size=2, extra_key="lora-a"),
        BlockRemoved(block_hashes=[big, 3]),
        AllBlocksCleared(),
    ])
    fields = encode_batch(batch, "w1")
    raw = {k.encode(): v.encode() for k, v in fields.items()}  # what redis-py returns
    assert decode_entry(raw) == ("w1", batch)
    assert decode_entry(fields) == ("w1", batch)


def test_forwarder_writes_batches_from_another_thread_in_order(redis_url: str) -> None:
    async def go() -> list[tuple[str, KVEventBatch]]:
        client = aioredis.Redis.from_url(redis_url)
        pub = InProcessPublisher()
        fwd = RedisKVEventForwarder(client, "fw1", asyncio.get_running_loop(), maxlen=1000)
        pub.subscribe(fwd.on_batch)
        task = asyncio.create_task(fwd.run())

        def engine_thread() -> None:
            for i in range(50):
                pub.publish([stored([i, i + 1])])
            pub.publish([BlockRemoved(block_hashes=[1])])

        t = threading.Thread(target=engine_thread)
        t.start()
        await asyncio.to_thread(t.join, 10)
        fwd.stop()
        await asyncio.wait_for(task, 10)
        entries = [decode_entry(f) for _, f in await client.xrange(stream_key("sglang", "fw1"))]
        await client.aclose()
        return entries

    entries = asyncio.run(go())
    seqs = [b.seq for _, b in entries]
    assert seqs == [CLEARED_SEQ, *range(51), CLEARED_SEQ]  # start marker, every batch in order, stop marker
    assert all(wid == "fw1" for wid, _ in entries)
    assert entries[1][1].events == [stored([0, 1])]
    assert entries[-2][1].events == [BlockRemoved(block_hashes=[1])]
    assert entries[-1][1].events == [AllBlocksCleared()]


def test_stop_during_a_write_still_writes_the_stop_marker_and_returns(redis_url: str) -> None:
    async def go() -> list[int]:
        client = aioredis.Redis.from_url(redis_url)
        fwd = RedisKVEventForwarder(client, "fw2", asyncio.get_running_loop())
        task = asyncio.create_task(fwd.run())
        fwd.on_batch(KVEventBatch(seq=0, ts=0.0, events=[AllBlocksCleared()]))
        await asyncio.sleep(0)  # the task is now writing
        fwd.stop()
        await asyncio.wait_for(task, 5)
        seqs = [decode_entry(f)[1].seq for _, f in await client.xrange(stream_key("sglang", "fw2"))]
        await client.aclose()
        return seqs

    assert asyncio.run(go()) == [CLEARED_SEQ, 0, CLEARED_SEQ]


def test_redis_down_does_not_block_the_engine_and_stop_returns() -> None:
    async def go() -> int:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        fwd = RedisKVEventForwarder(client, "fw3", asyncio.get_running_loop(), max_pending=10)
        task = asyncio.create_task(fwd.run())
        for i in range(100):  # never blocks; the oldest are dropped past max_pending
            fwd.on_batch(KVEventBatch(seq=i, ts=0.0, events=[AllBlocksCleared()]))
        await asyncio.sleep(0.3)
        fwd.stop()
        await asyncio.wait_for(task, 5)
        await client.aclose()
        return fwd.num_written

    assert asyncio.run(go()) == 0
