"""Prefill/decode disaggregation inside one process: a prefill ``Engine`` and a decode ``Engine``
moving KV pages over real NIXL (UCX on DRAM, ``UCX_NET_DEVICES=lo``) and a real redis-server,
against a unified ``Engine`` with the same settings.

- 32 concurrent requests of mixed lengths (1..300 tokens, chunked prefill of 32 tokens, several
  sharing long prefixes) give token-identical greedy output, with page_size 1 and 16; a second pass
  hits the prefill side's prefix cache (``cached_tokens > 0``) and is still identical;
- failures end both halves quickly and free every page: an incompatible KV layout (page_size 1 vs
  16) names the field, the client aborting either half mid-transfer, a room nobody prefills.

After every test both engines of each pair pass ``check_integrity()`` with 0 pages in use.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sglang.engine.engine import Engine

from tests.helpers.redis_server import start_redis
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration

VOCAB = 256
CHUNK = 32
COMMON = {"skip_tokenizer_init": True, "device": "cpu", "dtype": "float32", "max_total_tokens": 4096,
          "chunked_prefill_size": CHUNK, "max_running_requests": 64}
TIMEOUT_S = 10.0  # kv_transfer_timeout_s: the connector's own bound; tests expect far less


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


SHARED = [_tokens(120, seed=1000), _tokens(70, seed=1001)]


def _prompts() -> list[list[int]]:
    """32 prompts: lengths 1..300, half of them behind one of two shared prefixes."""
    rng = random.Random(7)
    out: list[list[int]] = []
    for i in range(32):
        n = [1, 2, 5, 15, 16, 17, 31, 33, 64, 100, 150, 300][i % 12] if i < 12 else rng.randrange(1, 200)
        tail = _tokens(n, seed=i)
        out.append(SHARED[(i // 2) % 2] + tail[: max(1, n // 3)] if i % 2 == 0 and i >= 12 else tail)
    return out


PROMPTS = _prompts()
PARAMS = [{"temperature": 0, "max_new_tokens": 1 + (i * 5) % 12, "ignore_eos": True} for i in range(32)]


@pytest.fixture(scope="module", autouse=True)
def _ucx_loopback() -> Iterator[None]:
    old = os.environ.get("UCX_NET_DEVICES")
    os.environ["UCX_NET_DEVICES"] = "lo"
    yield
    if old is None:
        os.environ.pop("UCX_NET_DEVICES", None)
    else:
        os.environ["UCX_NET_DEVICES"] = old


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url, stop = start_redis()
    yield url
    stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("pd-llama"), vocab_size=VOCAB, seed=3)


class Trio:
    def __init__(self, model_dir: Path, redis_url: str, page_size: int) -> None:
        kw: dict[str, Any] = {**COMMON, "page_size": page_size}
        pd: dict[str, Any] = {"kv_transfer_redis_url": redis_url, "kv_transfer_timeout_s": TIMEOUT_S}
        self.page_size = page_size
        self.unified = Engine(model_path=str(model_dir), **kw)
        self.prefill = Engine(model_path=str(model_dir), **kw, **pd, disaggregation_mode="prefill",
                              kv_transfer_agent_name=f"test-prefill-p{page_size}-{os.getpid()}")
        self.decode = Engine(model_path=str(model_dir), **kw, **pd, disaggregation_mode="decode",
                             kv_transfer_agent_name=f"test-decode-p{page_size}-{os.getpid()}")

    def shutdown(self) -> None:
        for e in (self.unified, self.prefill, self.decode):
            e.shutdown()


@pytest.fixture(scope="module")
def trios(model_dir: Path, redis_url: str, _ucx_loopback: None) -> Iterator[dict[int, Trio]]:
    made = {ps: Trio(model_dir, redis_url, ps) for ps in (1, 16)}
    yield made
    for t in made.values():
        t.shutdown()


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "trios" not in request.fixturenames:
        return
    trios: dict[int, Trio] = request.getfixturevalue("trios")
    for t in trios.values():
        for e in (t.prefill, t.decode, t.unified):
            assert _pages_back(e, within_s=5.0), e.get_stats()
            e.check_integrity()


def _pages_back(engine: Engine, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        st = engine.get_stats()
        queues = st["num_prefill_inflight_queue_reqs"] + st["num_decode_prealloc_queue_reqs"]
        if st["num_used_pages"] == 0 and queues + st["num_decode_transfer_queue_reqs"] == 0:
            return True
        time.sleep(0.02)
    return False


def _room() -> int:
    return random.getrandbits(63)


async def _pd(
    prefill: Engine, decode: Engine, ids: list[int], params: dict[str, Any], room: int | None = None, **kw: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    room = _room() if room is None else room
    p = prefill.async_generate(input_ids=ids, sampling_params=params, bootstrap_room=room, **kw)
    d = decode.async_generate(input_ids=ids, sampling_params=params, bootstrap_room=room, **kw)
    got = await asyncio.wait_for(asyncio.gather(p, d), timeout=60)
    return got[0], got[1]  # type: ignore[return-value]


async def _pd_all(t: Trio, prompts: list[list[int]], **kw: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return list(await asyncio.gather(*[_pd(t.prefill, t.decode, p, PARAMS[i], **kw) for i, p in enumerate(prompts)]))


@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_token_identical_to_unified_with_prefix_hits(trios: dict[int, Trio], page_size: int) -> None:
    t = trios[page_size]
    ref = t.unified.generate(input_ids=PROMPTS, sampling_params=PARAMS, return_logprob=True)
    assert isinstance(ref, list)
    t.prefill.flush_cache()
    for wave in ("cold", "warm"):
        got = asyncio.run(_pd_all(t, PROMPTS, return_logprob=True))
        for i, ((pre, dec), r) in enumerate(zip(got, ref, strict=True)):
            assert dec["output_ids"] == r["output_ids"], (wave, i, len(PROMPTS[i]))
            assert pre["output_ids"] == r["output_ids"][:1], (wave, i)
            assert dec["meta_info"]["finish_reason"] == r["meta_info"]["finish_reason"]
            assert pre["meta_info"]["finish_reason"]["type"] in ("length", "stop")
            assert dec["meta_info"]["prompt_tokens"] == len(PROMPTS[i])
            assert dec["meta_info"]["cached_tokens"] == pre["meta_info"]["cached_tokens"]
            want = [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
            have = [lp for lp, _, _ in dec["meta_info"]["output_token_logprobs"]]
            assert have == pytest.approx(want, abs=1e-4), (wave, i)
        cached = [pre["meta_info"]["cached_tokens"] for pre, _ in got]
        shared = [i for i in range(12, 32, 2)]  # behind a 70- or 120-token shared prefix
        if wave == "warm":  # every prompt was prefilled before: the prefill side reuses its pages
            assert all(cached[i] >= 64 for i in shared), cached
            assert sum(cached) > sum(len(p) for p in PROMPTS) // 2, cached
    stats = t.prefill.get_stats()
    assert stats["kv_transfer_reqs_total"] >= 64 and stats["kv_transfer_bytes_total"] > 0
    assert t.decode.get_stats()["kv_transfer_reqs_total"] >= 64


def test_incompatible_layout_is_refused_naming_the_field(trios: dict[int, Trio]) -> None:
    """A prefill engine with page_size 1 paired with a decode engine with page_size 16."""
    t0 = time.monotonic()
    pre, dec = asyncio.run(_pd(trios[1].prefill, trios[16].decode, _tokens(40, 5), PARAMS[3]))
    elapsed = time.monotonic() - t0
    for out in (pre, dec):
        reason = out["meta_info"]["finish_reason"]
        assert reason["type"] == "abort", reason
        assert "page_size: prefill 1 != decode 16" in reason["message"], reason
    assert dec["output_ids"] == []
    assert elapsed < 5.0


async def _until(cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("side", ["decode", "prefill"])
def test_client_abort_mid_transfer_frees_both_sides(trios: dict[int, Trio], side: str) -> None:
    """Hold the prefill between chunks (test hook), abort one half: the other half fails fast."""
    t = trios[16]
    pd = t.prefill.scheduler.pd
    ids = _tokens(8 * CHUNK, 4242 + len(side))  # nothing cached: all 8 chunks are computed and written
    assert t.prefill.flush_cache()

    async def go() -> tuple[dict[str, Any], dict[str, Any], float]:
        room = _room()
        d = asyncio.ensure_future(t.decode.async_generate(
            input_ids=ids, sampling_params=PARAMS[5], bootstrap_room=room, rid=f"d-{room}"))
        # Published before the prefill starts, so that every chunk is written (and held).
        await _until(lambda: t.decode.get_stats()["num_decode_transfer_queue_reqs"] == 1, 10)
        p = asyncio.ensure_future(t.prefill.async_generate(
            input_ids=ids, sampling_params=PARAMS[5], bootstrap_room=room, rid=f"p-{room}"))
        await asyncio.sleep(0.3)  # a chunk or two of 8 are written; the prefill sleeps between them
        t0 = time.monotonic()
        (t.decode if side == "decode" else t.prefill).abort(f"{side[0]}-{room}")
        got = await asyncio.wait_for(asyncio.gather(p, d), 10)
        return got[0], got[1], time.monotonic() - t0  # type: ignore[return-value]

    pd.chunk_delay_s = 0.2  # type: ignore[union-attr]
    try:
        pre, dec, elapsed = asyncio.run(go())
    finally:
        pd.chunk_delay_s = 0.0  # type: ignore[union-attr]
    assert pre["meta_info"]["finish_reason"]["type"] == "abort", (pre, dec, elapsed)
    assert dec["meta_info"]["finish_reason"]["type"] == "abort"
    other = pre if side == "decode" else dec
    assert "gave up the room" in other["meta_info"]["finish_reason"]["message"]
    assert elapsed < 5.0
    assert dec["output_ids"] == []


def test_decode_room_nobody_prefills_times_out(trios: dict[int, Trio]) -> None:
    t = trios[1]
    receiver = t.decode.scheduler.pd.receiver  # type: ignore[union-attr]
    receiver.timeout_s = 1.0  # type: ignore[attr-defined]
    try:
        t0 = time.monotonic()
        out = t.decode.generate(input_ids=_tokens(20, 3), sampling_params=PARAMS[0], bootstrap_room=_room())
        elapsed = time.monotonic() - t0
    finally:
        receiver.timeout_s = TIMEOUT_S  # type: ignore[attr-defined]
    assert isinstance(out, dict)
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "timed out after 1s waiting for KV" in out["meta_info"]["finish_reason"]["message"]
    assert 0.9 < elapsed < 5.0
    assert t.decode.get_stats()["kv_transfer_failed_reqs_total"] >= 1


def test_bad_requests_are_refused_before_queueing(trios: dict[int, Trio]) -> None:
    t = trios[1]
    with pytest.raises(ValueError, match="bootstrap_room is required on a decode worker"):
        t.decode.generate(input_ids=[1, 2, 3], sampling_params=PARAMS[0])
    with pytest.raises(ValueError, match="bootstrap_room needs disaggregation_mode"):
        t.unified.generate(input_ids=[1, 2, 3], sampling_params=PARAMS[0], bootstrap_room=5)
    with pytest.raises(ValueError, match="pairs exactly one request"):
        t.prefill.generate(input_ids=[1, 2, 3], sampling_params={**PARAMS[0], "n": 2}, bootstrap_room=5)
