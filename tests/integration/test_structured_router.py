"""Structured output through the mesh: a real router process in front of a real worker process and a
real redis-server, called with the real ``openai`` client and raw HTTP.

``response_format`` ``json_schema`` gives content that validates; ``json_object`` content parses as
an object; ``regex`` / ``ebnf`` ride in ``extra_body`` and native ``/generate``; an invalid schema,
regex or grammar is a 400 naming the field the client set (``response_format``, ``regex``,
``ebnf``), streaming included, and the stack keeps serving with no KV page held on the worker.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from sglang.transport.worker_client import WorkerClient

from tests.helpers.mesh import one_worker_mesh
from tests.helpers.procs import WorkerProc, make_tiny_worker_model
from tests.helpers.router_procs import RouterProc, http_json

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "[a-z]{1,5}"}, "maxItems": 2},
    },
    "required": ["city", "population", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProc, RouterProc]]:
    model_dir = make_tiny_worker_model(tmp_path_factory.mktemp("tiny-structured"))
    args = ["--max-total-tokens", "4096", "--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", "2", "--metrics-port", "0"]
    with one_worker_mesh(model_dir, args) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def client(mesh: tuple[WorkerProc, RouterProc]) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh[1].url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _worker_load(worker: WorkerProc) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        c = WorkerClient(worker.addr)
        try:
            return await c.get_load()
        finally:
            await c.close()

    return asyncio.run(go())


def _idle_and_clean(worker: WorkerProc) -> None:
    load = _worker_load(worker)
    assert load["num_running_reqs"] == 0 and load["num_used_pages"] == 0, load


def test_response_format_json_schema_validates(client: openai.OpenAI, model: str, mesh: tuple[WorkerProc, RouterProc]) -> None:
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, n=6, temperature=1.0, max_tokens=96, seed=7,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    )
    assert len(out.choices) == 6
    for ch in out.choices:
        assert ch.finish_reason == "stop", ch
        jsonschema.validate(json.loads(ch.message.content or ""), SCHEMA)
    assert len({ch.message.content for ch in out.choices}) >= 2
    # Streaming: the deltas join into a valid document.
    chunks = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=96, stream=True,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    _idle_and_clean(mesh[0])


def test_response_format_json_object_is_an_object(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=200,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
    )
    ch = out.choices[0]
    assert ch.finish_reason == "stop"
    assert isinstance(json.loads(ch.message.content or ""), dict)


def test_regex_and_ebnf_in_extra_body_and_native_generate(
    client: openai.OpenAI, model: str, mesh: tuple[WorkerProc, RouterProc]
) -> None:
    out = client.completions.create(
        model=model, prompt="Code:", max_tokens=32, temperature=1.0, n=3, extra_body={"regex": "[A-Z]{2}-[0-9]{2,4}"},
    )
    assert [bool(re.fullmatch("[A-Z]{2}-[0-9]{2,4}", c.text)) for c in out.choices] == [True] * 3
    status, body, _ = http_json(mesh[1].url + "/generate", {
        "text": "Answer:", "sampling_params": {"ebnf": 'root ::= "yes" | "no"', "max_new_tokens": 8, "temperature": 1.0},
    })
    assert status == 200 and body["text"] in ("yes", "no") and body["meta_info"]["finish_reason"]["type"] == "stop"


def test_invalid_grammars_are_400s_naming_the_field(
    client: openai.OpenAI, model: str, mesh: tuple[WorkerProc, RouterProc]
) -> None:
    worker, router = mesh
    bad_schema = {"type": "object", "properties": {"a": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=MESSAGES,  # type: ignore[arg-type]
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad_schema}},
        )
    assert e.value.status_code == 400 and e.value.param == "response_format"  # type: ignore[attr-defined]
    msg = e.value.body["message"]  # type: ignore[index]
    assert msg == 'response_format: invalid JSON schema: Unsupported type "nope"; fix response_format and retry'

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, extra_body={"regex": "[0-9"})  # type: ignore[arg-type]
    assert e.value.param == "regex"  # type: ignore[attr-defined]
    assert e.value.body["message"].startswith("regex: invalid regular expression: ")  # type: ignore[index]
    assert "Unclosed '['" in e.value.body["message"]  # type: ignore[index]
    # Streaming fails before the first event, so it is still a plain 400.
    status, body, _ = http_json(router.url + "/v1/chat/completions", {
        "model": model, "messages": MESSAGES, "stream": True, "ebnf": "root ::= nothing",
    })
    assert status == 400 and body["error"]["param"] == "ebnf" and 'Rule "nothing" is not defined' in body["error"]["message"]
    status, body, _ = http_json(router.url + "/generate", {"text": "x", "sampling_params": {"json_schema": "{not json"}})
    assert status == 400 and body["error"]["param"] == "json_schema"
    assert body["error"]["type"] == "invalid_request_error"
    # The stack keeps serving, and the refused requests never held a page.
    ok = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason == "length"
    _idle_and_clean(worker)
