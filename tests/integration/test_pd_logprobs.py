"""Logprobs through prefill/decode disaggregation: a prefill ``Engine`` and a decode ``Engine``
over real NIXL (UCX on DRAM, ``UCX_NET_DEVICES=lo``) and a real redis-server, against a unified
``Engine`` with the same settings (test_pd_engine.py's: chunked prefill of 32 tokens, page_size
1 and 16).

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
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sglang.engine.scheduler import pd_aux

# The same engines, fixtures (UCX loopback, redis-server, tiny llama) and leak check as there.
from tests.integration.test_pd_engine import (  # noqa: F401 - fixtures
    VOCAB,
    Trio,
    _pages_back,
    _ucx_loopback,
    model_dir,
    redis_url,
)

pytestmark = pytest.mark.integration

TOL = 1e-5


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


# Lengths around the chunk and page boundaries: 1 (no prompt logprob but position 0's), 16, 17, 33
# and 100 (four chunks).
PROMPTS = [_tokens(n, seed=50 + n) for n in (1, 16, 17, 33, 100)]
PARAMS = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}


@pytest.fixture(scope="module")
def trios(model_dir: Path, redis_url: str, _ucx_loopback: None) -> Iterator[dict[int, Trio]]:  # noqa: F811
    made = {ps: Trio(model_dir, redis_url, ps) for ps in (1, 16)}
    yield made
    for t in made.values():
        t.shutdown()


@pytest.fixture(autouse=True)
def _no_leaks(trios: dict[int, Trio]) -> Iterator[None]:
    yield
    for t in trios.values():
        for e in (t.unified, t.prefill, t.decode):
            assert _pages_back(e, within_s=5.0), e.get_stats()
            e.check_integrity()


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
