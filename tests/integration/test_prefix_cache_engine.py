"""The prefix cache inside the engine: same tokens with the cache on and off, cached_tokens,
in-flight and in-batch sharing, eviction under pressure, flush, KV events. No page leaks."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from sglang.engine.engine import Engine

from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration

VOCAB = 256
NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"), vocab_size=VOCAB, seed=5)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


SYSTEM = _tokens(200, seed=100)
PROMPTS = [SYSTEM + _tokens(n, seed=n) for n in (3, 40, 17, 90)] + [_tokens(150, seed=7), SYSTEM[:120] + [1, 2]]


def _engine(model_dir: Path, **kw) -> Engine:
    return Engine(model_path=str(model_dir), skip_tokenizer_init=True, device="cpu", dtype="float32", **kw)


def _finish(engine: Engine) -> dict:
    engine.check_integrity()
    stats = engine.get_stats()
    assert stats["num_used_pages"] == 0, stats
    engine.shutdown()
    return stats


def _waves(engine: Engine) -> list[list[int]]:
    """First one prompt alone (fills the cache), then all at once, then the same again."""
    first = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    batch = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    again = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert isinstance(first, dict) and isinstance(batch, list) and isinstance(again, list)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in batch]
    assert first["output_ids"] == batch[0]["output_ids"]
    return [o["output_ids"] for o in batch]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[list[int]]:
    eng = _engine(model_dir, disable_radix_cache=True, page_size=1)
    out = _waves(eng)
    _finish(eng)
    return out


@pytest.mark.parametrize(
    "settings",
    [
        {"page_size": 1},
        {"page_size": 16},
        {"page_size": 16, "chunked_prefill_size": 32},
        {"page_size": 1, "chunked_prefill_size": 32, "schedule_policy": "lpm"},
        {"page_size": 1, "max_total_tokens": 330, "new_token_ratio": 0.0},
        {"page_size": 4, "eviction_policy": "lfu", "max_total_tokens": 400, "new_token_ratio": 0.0},
    ],
    ids=["p1", "p16", "p16-chunk32", "p1-chunk32-lpm", "p1-retract", "p4-lfu-tight"],
)
def test_same_tokens_with_cache_on_and_off(model_dir: Path, reference: list[list[int]], settings: dict) -> None:
    eng = _engine(model_dir, **settings)
    got = _waves(eng)
    stats = _finish(eng)
    assert got == reference
    assert stats["cache_hit_rate"] > 0
    if "max_total_tokens" in settings:
        assert stats["num_evicted_pages"] > 0  # the cache gave pages back under pressure


@pytest.mark.parametrize("page_size", [1, 16])
def test_retraction_with_cache_keeps_tokens(model_dir: Path, page_size: int) -> None:
    """Three 90-token prompts (+30 new) overflow a 320-token pool; decode must retract, and the retracted
    request's computed prefix stays cached, so its recompute is a cache hit."""
    prompts = [_tokens(90, seed=200 + i) for i in range(3)]
    params = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}
    ref_eng = _engine(model_dir, page_size=page_size, disable_radix_cache=True)
    ref = ref_eng.generate(input_ids=prompts, sampling_params=params)
    _finish(ref_eng)
    eng = _engine(model_dir, page_size=page_size, max_total_tokens=320, new_token_ratio=0.0)
    got = eng.generate(input_ids=prompts, sampling_params=params)
    stats = _finish(eng)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in ref]  # type: ignore[index]
    assert stats["num_retractions"] > 0
    assert stats["cache_hit_rate"] > 0


@pytest.mark.parametrize("page_size", [1, 16])
def test_cached_tokens_of_second_request(model_dir: Path, page_size: int) -> None:
    eng = _engine(model_dir, page_size=page_size)
    a = eng.generate(input_ids=SYSTEM + [1, 2, 3], sampling_params=GREEDY)
    b = eng.generate(input_ids=SYSTEM + [9, 8], sampling_params=GREEDY)
    assert isinstance(a, dict) and isinstance(b, dict)
    assert a["meta_info"]["cached_tokens"] == 0
    assert b["meta_info"]["cached_tokens"] >= 200 - page_size
    assert b["meta_info"]["cached_tokens"] == (200 // page_size) * page_size
    _finish(eng)


def test_in_batch_sharing_computes_prefix_once(model_dir: Path) -> None:
    eng = _engine(model_dir, page_size=4)
    outs = eng.generate(input_ids=PROMPTS[:4], sampling_params=GREEDY)
    assert isinstance(outs, list)
    cached = [o["meta_info"]["cached_tokens"] for o in outs]
    # The first computes the 200-token system prompt; the others wait one step and reuse it.
    assert cached[0] == 0
    assert all(c == 200 for c in cached[1:]), cached
    _finish(eng)


def test_in_flight_prefill_is_shared(model_dir: Path) -> None:
    """A request arriving during a long chunked prefill reuses the chunks already computed."""
    eng = _engine(model_dir, page_size=4, chunked_prefill_size=32)
    long_prompt = SYSTEM + _tokens(300, seed=11)

    async def go() -> tuple[dict, dict]:
        t1 = asyncio.ensure_future(eng.async_generate(input_ids=long_prompt, sampling_params=GREEDY))
        while eng.get_stats()["num_cached_pages"] < 100 // 4:
            await asyncio.sleep(0.001)
        second = await eng.async_generate(input_ids=long_prompt[:400] + [5], sampling_params=GREEDY)
        return await t1, second  # type: ignore[return-value]

    first, second = asyncio.run(go())
    assert second["meta_info"]["cached_tokens"] >= 100
    solo = _engine(model_dir, page_size=4, disable_radix_cache=True)
    ref = solo.generate(input_ids=[long_prompt, long_prompt[:400] + [5]], sampling_params=GREEDY)
    _finish(solo)
    assert [first["output_ids"], second["output_ids"]] == [o["output_ids"] for o in ref]  # type: ignore[index]
    _finish(eng)


def test_disable_radix_cache(model_dir: Path) -> None:
    eng = _engine(model_dir, page_size=4, disable_radix_cache=True)
    eng.generate(input_ids=SYSTEM + [1], sampling_params=GREEDY)
    b = eng.generate(input_ids=SYSTEM + [2], sampling_params=GREEDY)
    assert isinstance(b, dict) and b["meta_info"]["cached_tokens"] == 0
    assert _finish(eng)["num_cached_pages"] == 0


def test_flush_cache_and_events(model_dir: Path) -> None:
    eng = _engine(model_dir, page_size=4)
    seen: list = []
    eng.kv_events.subscribe(seen.extend)
    eng.generate(input_ids=SYSTEM + [1], sampling_params=GREEDY)
    stored = [e for e in seen if type(e).__name__ == "BlockStored"]
    # 201 prompt + 8 output tokens, of which 208 have KV (not the last output): 52 pages of 4.
    assert sum(len(e.block_hashes) for e in stored) == 52
    assert eng.get_stats()["num_cached_pages"] == 52
    assert eng.flush_cache() is True
    assert type(seen[-1]).__name__ == "AllBlocksCleared"
    assert eng.get_stats()["num_cached_pages"] == 0
    b = eng.generate(input_ids=SYSTEM + [2], sampling_params=GREEDY)
    assert isinstance(b, dict) and b["meta_info"]["cached_tokens"] == 0
    _finish(eng)


def test_abort_keeps_no_pages_and_retains_prefix(model_dir: Path) -> None:
    eng = _engine(model_dir, page_size=4)
    stream = eng.generate(input_ids=SYSTEM, sampling_params={**GREEDY, "max_new_tokens": 300}, stream=True)
    for i, _ in enumerate(stream):  # type: ignore[arg-type]
        if i == 2:
            break
    stream.close()  # type: ignore[union-attr]
    b = eng.generate(input_ids=SYSTEM + [3], sampling_params=GREEDY)
    assert isinstance(b, dict) and b["meta_info"]["cached_tokens"] == 200
    _finish(eng)
