"""Structured output under prefill/decode disaggregation (in-process engines, real NIXL over UCX on
DRAM, real redis-server): the prefill engine samples the first token under the grammar, the decode
engine's matcher accepts it before its first decode step, and the result equals the unified
engine's greedy output token for token, schema-valid. Both sides end with 0 pages in use.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sglang.engine.engine import Engine

from tests.helpers.procs import make_tiny_worker_model
from tests.helpers.redis_server import start_redis

pytestmark = pytest.mark.integration

KW: dict[str, Any] = {"device": "cpu", "dtype": "float32", "max_total_tokens": 4096, "page_size": 16}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "[a-z]{1,6}"},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["x", "y", "z"]},
    },
    "required": ["name", "n", "kind"],
    "additionalProperties": False,
}
PROMPTS = ["Describe item one:", "JSON for two", "Three, please", "Emit the fourth object now:"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    model_dir: Path = make_tiny_worker_model(tmp_path_factory.mktemp("tiny-pd-structured"))
    old = os.environ.get("UCX_NET_DEVICES")
    os.environ["UCX_NET_DEVICES"] = "lo"
    url, stop_redis = start_redis()
    pd = {"kv_transfer_redis_url": url, "kv_transfer_timeout_s": 10.0}
    made: dict[str, Engine] = {}
    try:
        made["unified"] = Engine(model_path=str(model_dir), **KW)
        for mode in ("prefill", "decode"):
            made[mode] = Engine(model_path=str(model_dir), **KW, **pd, disaggregation_mode=mode,
                                kv_transfer_agent_name=f"structured-{mode}-{os.getpid()}")
        yield made
    finally:
        for e in made.values():
            e.shutdown()
        stop_redis()
        if old is None:
            os.environ.pop("UCX_NET_DEVICES", None)
        else:
            os.environ["UCX_NET_DEVICES"] = old


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engines" not in request.fixturenames:
        return
    for e in request.getfixturevalue("engines").values():
        deadline = time.monotonic() + 5
        while e.get_stats()["num_used_pages"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert e.get_stats()["num_used_pages"] == 0
        e.check_integrity()


async def _pd(engines: dict[str, Engine], prompt: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    room = random.getrandbits(63)
    p = engines["prefill"].async_generate(prompt, params, bootstrap_room=room)
    d = engines["decode"].async_generate(prompt, params, bootstrap_room=room)
    got = await asyncio.wait_for(asyncio.gather(p, d), timeout=60)
    return got[0], got[1]  # type: ignore[return-value]


async def _pd_all(engines: dict[str, Engine], params: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return list(await asyncio.gather(*[_pd(engines, p, params) for p in PROMPTS]))


def test_json_schema_through_prefill_and_decode_equals_unified(engines: dict[str, Engine]) -> None:
    params = {"json_schema": json.dumps(SCHEMA), "temperature": 0, "max_new_tokens": 96}
    ref = engines["unified"].generate(PROMPTS, params)
    assert isinstance(ref, list)
    for (pre, dec), r in zip(asyncio.run(_pd_all(engines, params)), ref, strict=True):
        assert r["meta_info"]["finish_reason"]["type"] == "stop"
        jsonschema.validate(json.loads(r["text"]), SCHEMA)
        assert pre["output_ids"] == r["output_ids"][:1]  # the first token, sampled under the grammar
        assert dec["output_ids"] == r["output_ids"]
        assert dec["text"] == r["text"]
        assert dec["meta_info"]["finish_reason"] == r["meta_info"]["finish_reason"]


def test_sampled_regex_and_a_first_token_that_completes_the_grammar(engines: dict[str, Engine]) -> None:
    sampled = asyncio.run(_pd_all(engines, {"regex": "[a-z]{2,4}-[0-9]{2}", "temperature": 1.0, "max_new_tokens": 32}))
    for _, dec in sampled:
        assert re.fullmatch("[a-z]{2,4}-[0-9]{2}", dec["text"]), dec["text"]
        assert dec["meta_info"]["finish_reason"]["type"] == "stop"
    # One digit: the prefill's first token completes the grammar, the decode side then allows only EOS.
    params = {"regex": "[0-9]", "temperature": 0, "max_new_tokens": 8}
    ref = engines["unified"].generate(PROMPTS, params)
    assert isinstance(ref, list)
    for (pre, dec), r in zip(asyncio.run(_pd_all(engines, params)), ref, strict=True):
        assert len(r["output_ids"]) == 2 and re.fullmatch("[0-9]", r["text"])
        assert pre["output_ids"] == r["output_ids"][:1] and dec["output_ids"] == r["output_ids"]
