"""Overlap scheduling (engine/scheduler/overlap.py) forced on for the CPU engine: the same tokens,
finish reasons and logprobs as the synchronous scheduler (and HF), with early stops, stop strings
of tokens, mixed plain and penalised/grammar-free requests, aborts and retraction; no page leaks."""

from __future__ import annotations

import math
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sglang.engine.engine import Engine

from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration

VOCAB = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("ov"), vocab_size=VOCAB, seed=5)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.choice([1, 3, 17, 40, 90]))] for _ in range(n)]


def _run(path: Path, prompts: list[list[int]], params: list[dict[str, Any]], overlap: str, **kw: Any) -> tuple[list[Any], Engine]:
    eng = Engine(model_path=str(path), skip_tokenizer_init=True, device="cpu", dtype="float32",
                 overlap_schedule=overlap, **kw)
    try:
        outs = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        eng.check_integrity()
        assert eng.get_stats()["num_used_pages"] == 0
        return outs, eng  # type: ignore[return-value]
    finally:
        eng.shutdown()


def _key(o: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(o["output_ids"]), str(o["meta_info"]["finish_reason"])


def _logprobs(o: dict[str, Any]) -> list[float]:
    return [lp[0] for lp in o["meta_info"]["output_token_logprobs"]]


@pytest.mark.parametrize("page_size", [1, 16])
def test_overlap_equals_sync_with_early_stops(model_dir: Path, page_size: int) -> None:
    prompts = _prompts(20, seed=page_size)
    rng = random.Random(3)
    params: list[dict[str, Any]] = []
    for i in range(len(prompts)):
        p: dict[str, Any] = {"temperature": 0, "max_new_tokens": rng.choice([1, 2, 5, 16, 30])}
        if i % 3 == 0:
            p["stop_token_ids"] = [rng.randrange(VOCAB) for _ in range(40)]  # stops early, at varying steps
        else:
            p["ignore_eos"] = True
        if i % 7 == 0:
            p["frequency_penalty"] = 0.5  # not plain: steps with it run synchronously
        params.append(p)
    sync, _ = _run(model_dir, prompts, params, "off", page_size=page_size, chunked_prefill_size=64)
    ov, eng = _run(model_dir, prompts, params, "on", page_size=page_size, chunked_prefill_size=64)
    assert [_key(o) for o in ov] == [_key(o) for o in sync]
    for a, b in zip(ov, sync, strict=True):  # batches differ in composition: float noise only
        assert _logprobs(a) == pytest.approx(_logprobs(b), abs=1e-4)
    stops = [o for o in sync if o["meta_info"]["finish_reason"]["type"] == "stop"]
    assert stops, "the stop tokens never fired: the test would not cover early finishes"
    assert eng.scheduler.num_overlapped_steps > 0


def test_overlap_only_plain_requests_all_overlapped(model_dir: Path) -> None:
    prompts = _prompts(8, seed=9)
    params = [{"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}] * len(prompts)
    sync, _ = _run(model_dir, prompts, params, "off", page_size=4)
    ov, eng = _run(model_dir, prompts, params, "on", page_size=4)
    assert [o["output_ids"] for o in ov] == [o["output_ids"] for o in sync]
    assert all(len(o["output_ids"]) == 12 for o in ov)
    # 11 decode steps after the prefill's first token; all of them overlapped.
    assert eng.scheduler.num_overlapped_steps >= 10


def test_overlap_runs_prefill_ahead_including_chunks(model_dir: Path) -> None:
    """Prefill batches are launched before the previous batch's tokens are read, chunked prompts
    (chunks that do not sample) included: the same tokens and logprobs as the synchronous
    scheduler, every step overlapped, no pages leaked."""
    prompts = _prompts(10, seed=21) + [[7] * 150, [9] * 61]
    params = [{"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}] * len(prompts)
    sync, _ = _run(model_dir, prompts, params, "off", page_size=4, chunked_prefill_size=48)
    ov, eng = _run(model_dir, prompts, params, "on", page_size=4, chunked_prefill_size=48)
    assert [o["output_ids"] for o in ov] == [o["output_ids"] for o in sync]
    for a, b in zip(ov, sync, strict=True):
        assert _logprobs(a) == pytest.approx(_logprobs(b), abs=1e-4)
    s = eng.scheduler
    extends = sum(len(p) for p in prompts) // 48  # at least this many prefill steps
    assert s.num_overlapped_extends >= extends
    assert s.num_overlapped_steps == s.num_steps  # nothing here needs a synchronous step


def test_prompt_logprobs_keep_prefill_synchronous(model_dir: Path) -> None:
    """Prompt logprobs are read from a prefill's logits on the host, so those prefill batches run
    synchronously (decode still overlaps); values equal the synchronous scheduler's."""
    prompts = _prompts(6, seed=22)
    params = [{"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}] * len(prompts)
    outs: dict[str, Any] = {}
    for mode in ("off", "on"):
        eng = Engine(model_path=str(model_dir), skip_tokenizer_init=True, device="cpu", dtype="float32",
                     overlap_schedule=mode, page_size=4, chunked_prefill_size=32)
        try:
            outs[mode] = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
            eng.check_integrity()
            assert eng.get_stats()["num_used_pages"] == 0
            if mode == "on":
                assert eng.scheduler.num_overlapped_extends == 0
                assert eng.scheduler.num_overlapped_steps > 0
        finally:
            eng.shutdown()
    assert [o["output_ids"] for o in outs["on"]] == [o["output_ids"] for o in outs["off"]]
    for a, b in zip(outs["on"], outs["off"], strict=True):
        pa = [lp[0] for lp in a["meta_info"]["input_token_logprobs"]]
        pb = [lp[0] for lp in b["meta_info"]["input_token_logprobs"]]
        assert pa[0] is None and pb[0] is None and len(pa) == len(pb)
        assert pa[1:] == pytest.approx(pb[1:], abs=1e-4)


def test_overlap_with_retraction(model_dir: Path) -> None:
    prompts = _prompts(12, seed=11)
    params = [{"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}] * len(prompts)
    sync, _ = _run(model_dir, prompts, params, "off", page_size=4, max_total_tokens=400, new_token_ratio=0.0)
    ov, eng = _run(model_dir, prompts, params, "on", page_size=4, max_total_tokens=400, new_token_ratio=0.0)
    assert [o["output_ids"] for o in ov] == [o["output_ids"] for o in sync]
    assert eng.scheduler.num_retractions > 0 and eng.scheduler.num_overlapped_steps > 0


def test_overlap_sampling_with_seed_matches_sync(model_dir: Path) -> None:
    prompts = _prompts(6, seed=13)
    params = [{"temperature": 0.9, "top_p": 0.9, "seed": 100 + i, "max_new_tokens": 10, "ignore_eos": True}
              for i in range(len(prompts))]
    sync, _ = _run(model_dir, prompts, params, "off")
    ov, _ = _run(model_dir, prompts, params, "on")
    assert [o["output_ids"] for o in ov] == [o["output_ids"] for o in sync]


def test_overlap_abort_leaks_nothing(model_dir: Path) -> None:
    eng = Engine(model_path=str(model_dir), skip_tokenizer_init=True, device="cpu", dtype="float32",
                 overlap_schedule="on", page_size=4)
    try:
        res: dict[str, Any] = {}

        def long() -> None:
            res["out"] = eng.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2000, "ignore_eos": True},
                                      rid="victim")
        t = threading.Thread(target=long)
        t.start()
        other = eng.generate(input_ids=[[5, 6, 7]] * 3, sampling_params={"temperature": 0, "max_new_tokens": 20, "ignore_eos": True})
        time.sleep(0.2)
        eng.abort("victim")
        t.join(timeout=30)
        assert res["out"]["meta_info"]["finish_reason"]["type"] == "abort"
        assert all(len(o["output_ids"]) == 20 for o in other)  # type: ignore[index]
        deadline = time.time() + 10
        while eng.get_stats()["num_used_pages"] and time.time() < deadline:
            time.sleep(0.01)
        eng.check_integrity()
        assert eng.get_stats()["num_used_pages"] == 0
        assert eng.scheduler.num_overlapped_steps > 0
    finally:
        eng.shutdown()


@pytest.mark.parametrize("overlap", ["on", "off"])
def test_logprobs_only_for_requests_that_ask(model_dir: Path, overlap: str) -> None:
    """Requests with and without ``return_logprob`` share decode batches: the sampler skips the
    logprobs only when no row asks, so the asking requests get the same values as when every
    request asks, and the tokens do not change."""
    asking, quiet = _prompts(4, seed=11), _prompts(4, seed=12)
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    ref_outs, _ = _run(model_dir, asking + quiet, [params] * 8, overlap)
    eng = Engine(model_path=str(model_dir), skip_tokenizer_init=True, device="cpu", dtype="float32",
                 overlap_schedule=overlap)
    try:
        got: dict[str, Any] = {}

        def call(name: str, prompts: list[list[int]], lp: bool) -> None:
            got[name] = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=lp)

        threads = [threading.Thread(target=call, args=("quiet", quiet, False)),
                   threading.Thread(target=call, args=("asking", asking, True))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        eng.check_integrity()
        assert eng.get_stats()["num_used_pages"] == 0
    finally:
        eng.shutdown()
    assert [o["output_ids"] for o in got["asking"] + got["quiet"]] == [o["output_ids"] for o in ref_outs]
    for o, ref in zip(got["asking"], ref_outs[:4], strict=True):
        assert _logprobs(o) == pytest.approx(_logprobs(ref), abs=1e-4)
        assert all(math.isfinite(v) for v in _logprobs(o))
    for o in got["quiet"]:
        assert not o["meta_info"].get("output_token_logprobs")
