"""Logprobs through prefill/decode disaggregation: a prefill ``Engine`` and a decode ``Engine``
over real NIXL (UCX on DRAM, ``UCX_NET_DEVICES=lo``) and a real redis-server, against a unified
``Engine`` with the same settings (chunked prefill of 32 tokens, page_size 1 and 16).

- ``return_logprob=True, logprob_start_len=0|5, top_logprobs_num=3``: the decode half reports the
  same ``output_ids``, ``output_token_logprobs``, ``output_top_logprobs`` (the first token's top
  logprobs come from the prefill side), ``input_token_logprobs`` and ``input_top_logprobs`` (the
  prompt logprobs come from the prefill side, packed as float32 arrays) as the unified engine;
- without prompt logprobs (no ``logprob_start_len``), and without logprobs at all, it still does;
- halves with different logprob options, or prompt logprobs over the notification bound, fail
  with a message that says so, and free every page.
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
from sglang.engine.scheduler import pd_aux

from tests.helpers.redis_server import start_redis
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration

VOCAB = 256
CHUNK = 32
COMMON = {"skip_tokenizer_init": True, "device": "cpu", "dtype": "float32", "max_total_tokens": 2048,
          "chunked_prefill_size": CHUNK, "max_running_requests": 16}
TIMEOUT_S = 10.0
TOL = 1e-5


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


# Lengths around the chunk and page boundaries: 1 (no prompt logprob but position 0's), 16, 17, 33
# and 100 (four chunks).
PROMPTS = [_tokens(n, seed=50 + n) for n in (1, 16, 17, 33, 100)]
PARAMS = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}


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
    return make_tiny_model("llama", tmp_path_factory.mktemp("pd-lp-llama"), vocab_size=VOCAB, seed=3)


class Trio:
    def __init__(self, model_dir: Path, redis_url: str, page_size: int) -> None:
        kw: dict[str, Any] = {**COMMON, "page_size": page_size}
        pd: dict[str, Any] = {"kv_transfer_redis_url": redis_url, "kv_transfer_timeout_s": TIMEOUT_S}
        self.unified = Engine(model_path=str(model_dir), **kw)
        self.prefill = Engine(model_path=str(model_dir), **kw, **pd, disaggregation_mode="prefill",
                              kv_transfer_agent_name=f"lp-prefill-p{page_size}-{os.getpid()}")
        self.decode = Engine(model_path=str(model_dir), **kw, **pd, disaggregation_mode="decode",
                             kv_transfer_agent_name=f"lp-decode-p{page_size}-{os.getpid()}")

    @property
    def engines(self) -> tuple[Engine, Engine, Engine]:
        return self.unified, self.prefill, self.decode

    def shutdown(self) -> None:
        for e in self.engines:
            e.shutdown()


@pytest.fixture(scope="module")
def trios(model_dir: Path, redis_url: str, _ucx_loopback: None) -> Iterator[dict[int, Trio]]:
    made = {ps: Trio(model_dir, redis_url, ps) for ps in (1, 16)}
    yield made
    for t in made.values():
        t.shutdown()


@pytest.fixture(autouse=True)
def _no_leaks(trios: dict[int, Trio]) -> Iterator[None]:
    yield
    for t in trios.values():
        for e in t.engines:
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


async def _pd(
    t: Trio, ids: list[int], p_kw: dict[str, Any], d_kw: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    room = random.getrandbits(63)
    p = t.prefill.async_generate(input_ids=ids, sampling_params=PARAMS, bootstrap_room=room, **p_kw)
    d = t.decode.async_generate(input_ids=ids, sampling_params=PARAMS, bootstrap_room=room,
                                **(p_kw if d_kw is None else d_kw))
    got = await asyncio.wait_for(asyncio.gather(p, d), timeout=60)
    return got[0], got[1]  # type: ignore[return-value]


def _run_pd(t: Trio, kw: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    async def go() -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return list(await asyncio.gather(*[_pd(t, ids, kw) for ids in PROMPTS]))

    return asyncio.run(go())


def _same_entries(have: list[Any], want: list[Any], what: str) -> None:
    """Lists of ``(logprob | None, token_id, None)``: same ids and Nones, logprobs to ``TOL``."""
    assert len(have) == len(want), (what, len(have), len(want))
    for i, (h, w) in enumerate(zip(have, want, strict=True)):
        assert tuple(h)[1:] == tuple(w)[1:], (what, i, h, w)
        if w[0] is None:
            assert h[0] is None, (what, i, h)
        else:
            assert h[0] == pytest.approx(w[0], abs=TOL), (what, i, h, w)


def _same_tops(have: list[Any], want: list[Any], what: str) -> None:
    assert len(have) == len(want), (what, len(have), len(want))
    for i, (h, w) in enumerate(zip(have, want, strict=True)):
        if w is None:
            assert h is None, (what, i, h)
        else:
            assert h is not None, (what, i)
            _same_entries(h, w, f"{what}[{i}]")


def _assert_same(dec: dict[str, Any], ref: dict[str, Any], top: bool) -> None:
    assert dec["output_ids"] == ref["output_ids"]
    assert dec["meta_info"]["finish_reason"] == ref["meta_info"]["finish_reason"]
    d, r = dec["meta_info"], ref["meta_info"]
    _same_entries(d["output_token_logprobs"], r["output_token_logprobs"], "output_token_logprobs")
    _same_entries(d["input_token_logprobs"], r["input_token_logprobs"], "input_token_logprobs")
    assert ("output_top_logprobs" in d) == top and ("input_top_logprobs" in d) == top
    if top:
        _same_tops(d["output_top_logprobs"], r["output_top_logprobs"], "output_top_logprobs")
        _same_tops(d["input_top_logprobs"], r["input_top_logprobs"], "input_top_logprobs")


@pytest.mark.parametrize("start", [0, 5])
@pytest.mark.parametrize("page_size", [1, 16])
def test_prompt_and_top_logprobs_equal_unified(trios: dict[int, Trio], page_size: int, start: int) -> None:
    t = trios[page_size]
    kw = {"return_logprob": True, "logprob_start_len": start, "top_logprobs_num": 3}
    ref = t.unified.generate(input_ids=PROMPTS, sampling_params=PARAMS, **kw)
    assert isinstance(ref, list)
    t.prefill.flush_cache()
    for i, ((pre, dec), r) in enumerate(zip(_run_pd(t, kw), ref, strict=True)):
        assert pre["meta_info"]["finish_reason"]["type"] in ("length", "stop"), (i, pre)
        _assert_same(dec, r, top=True)
        n = len(PROMPTS[i])
        assert len(dec["meta_info"]["input_token_logprobs"]) == (n if start == 0 else max(n - start, 0))
        assert len(dec["meta_info"]["output_top_logprobs"]) == PARAMS["max_new_tokens"]
        assert all(len(e) == 3 for e in dec["meta_info"]["output_top_logprobs"])
        if start == 0:
            assert dec["meta_info"]["input_token_logprobs"][0] == (None, PROMPTS[i][0], None)


@pytest.mark.parametrize("page_size", [1, 16])
def test_without_prompt_logprobs_equal_unified(trios: dict[int, Trio], page_size: int) -> None:
    t = trios[page_size]
    for kw, top in (({"return_logprob": True, "top_logprobs_num": 3}, True), ({"return_logprob": True}, False)):
        ref = t.unified.generate(input_ids=PROMPTS, sampling_params=PARAMS, **kw)
        assert isinstance(ref, list)
        for (_, dec), r in zip(_run_pd(t, kw), ref, strict=True):
            _assert_same(dec, r, top=top)
            assert dec["meta_info"]["input_token_logprobs"] == []
    ref = t.unified.generate(input_ids=PROMPTS, sampling_params=PARAMS)
    assert isinstance(ref, list)
    for (_, dec), r in zip(_run_pd(t, {}), ref, strict=True):
        assert dec["output_ids"] == r["output_ids"]
        assert "output_token_logprobs" not in dec["meta_info"]


def test_different_logprob_options_fail_with_a_message(trios: dict[int, Trio]) -> None:
    t = trios[16]
    kw = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3}
    pre, dec = asyncio.run(_pd(t, PROMPTS[3], {}, kw))
    assert pre["meta_info"]["finish_reason"]["type"] == "length"
    reason = dec["meta_info"]["finish_reason"]
    assert reason["type"] == "abort", dec
    assert "logprob options differ between the prefill side (return_logprob=False)" in reason["message"]
    assert dec["output_ids"] == []


def test_prompt_logprobs_over_the_bound_fail_both_halves(
    trios: dict[int, Trio], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = trios[1]
    monkeypatch.setattr(pd_aux, "MAX_AUX_BYTES", 600)  # 100 positions x (1 + 3 top) take more
    kw = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3}
    t0 = time.monotonic()
    pre, dec = asyncio.run(_pd(t, PROMPTS[4], kw))
    assert time.monotonic() - t0 < 5.0
    reason = pre["meta_info"]["finish_reason"]
    assert reason["type"] == "abort", pre
    assert "prompt logprobs for 100 positions with top_logprobs_num=3 take" in reason["message"]
    assert "over the 600-byte bound" in reason["message"]
    assert dec["meta_info"]["finish_reason"]["type"] == "abort", dec
    assert dec["output_ids"] == []
    # A short prompt still fits.
    pre, dec = asyncio.run(_pd(t, PROMPTS[0], kw))
    assert dec["meta_info"]["finish_reason"]["type"] == "length", dec
