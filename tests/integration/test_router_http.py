"""The router as a real process in front of two real workers and a real redis-server, called
through the real ``openai`` client, raw HTTP and gRPC: OpenAI chat/completions (stream and not,
n, stop, logprobs, max_tokens, seed) equal ``sglang.Engine`` in-process on the same model; native
``/generate``; ``Router.Generate``; 400s naming the field; API key; 503 with Retry-After; client
disconnect aborting on the worker; the shared prefix index on the same Redis."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis
from sglang.cluster.prefix_index import SharedPrefixIndex, page_hashes
from sglang.engine.engine import Engine
from sglang.engine.tokenizer import Tokenizer
from sglang.transport.router_service import RouterClient, RouterGenerateInput

from tests.helpers.procs import WorkerProc, make_tiny_worker_model, spawn_worker
from tests.helpers.redis_server import start_redis
from tests.helpers.router_procs import RouterProc, http_json, metric_value, router_env, spawn_router

pytestmark = pytest.mark.integration

WORKER_ARGS = ["--max-total-tokens", "8192", "--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", "2", "--metrics-port", "0"]
API_KEY = "sk-test-123"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_worker_model(tmp_path_factory.mktemp("tiny-router"))


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url, stop = start_redis()
    yield url
    stop()


@pytest.fixture(scope="module")
def mesh(redis_url: str, model_dir: Path) -> Iterator[tuple[list[WorkerProc], RouterProc, RouterProc]]:
    """Two workers; a cache_aware router; a round_robin router with an API key and room for one
    request per worker. Started at once (routers wait for the workers by themselves)."""
    wprocs = [spawn_worker(["--redis-url", redis_url, "--model-path", str(model_dir), *WORKER_ARGS], wait=False) for _ in range(2)]
    router = spawn_router(["--redis-url", redis_url, "--policy", "cache_aware", "--discovery-interval-s", "0.2"], wait=False)
    strict = spawn_router([
        "--redis-url", redis_url, "--api-key", API_KEY, "--max-inflight-per-worker", "1", "--retry-after-s", "7",
        "--policy", "round_robin", "--discovery-interval-s", "0.2",
    ], wait=False)
    try:
        ws = [p.wait_ready(90) for p in wprocs]
        yield ws, router.wait_ready().wait_healthy(workers=2, timeout_s=90), strict.wait_ready().wait_healthy(workers=2, timeout_s=90)
    finally:
        for proc in [router, strict, *wprocs]:
            proc.terminate()
        for r in (router, strict):
            tail = r.stderr_tail()
            assert r.stop() == 0, tail  # SIGTERM drains and exits cleanly
        for w in wprocs:
            w.stop()


@pytest.fixture(scope="module")
def workers(mesh: tuple[list[WorkerProc], RouterProc, RouterProc]) -> list[WorkerProc]:
    return mesh[0]


@pytest.fixture(scope="module")
def router(mesh: tuple[list[WorkerProc], RouterProc, RouterProc]) -> RouterProc:
    return mesh[1]


@pytest.fixture(scope="module")
def strict_router(mesh: tuple[list[WorkerProc], RouterProc, RouterProc]) -> RouterProc:
    return mesh[2]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine(model_path=str(model_dir), device="cpu", max_total_tokens=8192)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def client(router: RouterProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(model_dir: Path) -> str:
    return model_dir.name  # the worker's default served name


def ref(engine: Engine, ids: list[int], **params: Any) -> dict[str, Any]:
    out = engine.generate(input_ids=ids, sampling_params=params, return_logprob=True, top_logprobs_num=3)
    assert isinstance(out, dict)
    return out


# ---------------------------------------------------------------------------------------------
# OpenAI API
# ---------------------------------------------------------------------------------------------


def test_models_health_and_liveness(router: RouterProc, client: openai.OpenAI, model_name: str) -> None:
    assert [m.id for m in client.models.list().data] == [model_name]
    assert router.health() == (200, {"status": "ok", "workers": 2, "models": [model_name]})
    assert http_json(router.url + "/live")[0] == 200
    status, card, _ = http_json(router.url + f"/v1/models/{model_name}")
    assert status == 200 and card["max_model_len"] == 1024 and card["num_workers"] == 2
    assert http_json(router.url + "/v1/models/nope")[0] == 404
    status, out, _ = http_json(router.url + "/health_generate")
    assert status == 200 and out["status"] == "ok" and out["worker_id"]
    assert router.stdout_lines[0] == f"sglang_router ready http={router.url} grpc={router.grpc_addr}"


def test_cli_help_lists_every_setting() -> None:
    out = subprocess.run([sys.executable, "-m", "sglang_router", "--help"], capture_output=True, text=True,
                         env=router_env(), timeout=30, check=True).stdout
    for flag in ("--port", "--grpc-port", "--redis-url", "--policy", "--shared-index", "--api-key",
                 "--balance-abs-threshold", "--cache-threshold", "--max-tree-size", "--tokenizer-path"):
        assert flag in out
    bad = subprocess.run([sys.executable, "-m", "sglang_router", "--policy", "random"], capture_output=True, text=True,
                         env=router_env(), timeout=30)
    assert bad.returncode == 2 and "invalid choice: 'random'" in bad.stderr


def test_chat_greedy_equals_engine_stream_and_not(client: openai.OpenAI, engine: Engine, tok: Tokenizer, model_name: str) -> None:
    ids = tok.encode_chat(MESSAGES)
    want = ref(engine, ids, max_new_tokens=12, **GREEDY)
    resp = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}  # type: ignore[arg-type]
    )
    assert resp.object == "chat.completion" and resp.model == model_name
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == want["text"]
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (len(ids), 12, len(ids) + 12)

    chunks = list(client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt twice: a prefix hit
    assert len({c.id for c in chunks}) == 1


def test_completions_greedy_echo_batch_and_token_prompts(client: openai.OpenAI, engine: Engine, tok: Tokenizer, model_name: str) -> None:
    prompts = ["The quick brown fox", "Hello, world!"]
    wants = [ref(engine, tok.encode(p), max_new_tokens=8, **GREEDY)["text"] for p in prompts]
    resp = client.completions.create(model=model_name, prompt=prompts, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == wants
    assert resp.usage is not None and resp.usage.completion_tokens == 16
    echo = client.completions.create(model=model_name, prompt=prompts[0], max_tokens=8, temperature=0, echo=True,
                                     extra_body={"ignore_eos": True})
    assert echo.choices[0].text == prompts[0] + wants[0]
    by_ids = client.completions.create(model=model_name, prompt=tok.encode(prompts[1]), max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == wants[1]
    stream = client.completions.create(model=model_name, prompt=prompts[1], max_tokens=8, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    parts = list(stream)
    assert "".join(p.choices[0].text for p in parts if p.choices) == wants[1]
    assert parts[-1].choices[0].finish_reason == "length"


def _stop_candidate(text: str) -> str:
    """Two printable ASCII characters found after the start of ``text`` (a stop string)."""
    for i in range(2, len(text) - 1):
        s = text[i : i + 2]
        if s.isascii() and s.isprintable() and s.strip() == s and text.find(s) == i:
            return s
    raise AssertionError(f"no stop string candidate in {text!r}")


def test_stop_strings_trim_like_the_engine(client: openai.OpenAI, engine: Engine, tok: Tokenizer, model_name: str) -> None:
    ids = tok.encode_chat(MESSAGES)
    full = ref(engine, ids, max_new_tokens=40, **GREEDY)["text"]
    stop = _stop_candidate(full)
    want = ref(engine, ids, max_new_tokens=40, stop=[stop], **GREEDY)
    assert want["text"] == full[: full.index(stop)]
    for stream in (False, True):
        kw: dict[str, Any] = {"model": model_name, "messages": MESSAGES, "max_tokens": 40, "temperature": 0,
                              "stop": [stop, "never-there"], "extra_body": {"ignore_eos": True}}
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            choice = client.chat.completions.create(**kw).choices[0]
            text, finish = choice.message.content or "", [choice.finish_reason]
        assert text == want["text"] and finish == ["stop"]


def test_logprobs_match_the_engine(client: openai.OpenAI, engine: Engine, tok: Tokenizer, model_name: str) -> None:
    ids = tok.encode_chat(MESSAGES)
    want = ref(engine, ids, max_new_tokens=5, **GREEDY)["meta_info"]
    resp = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=5, temperature=0,  # type: ignore[arg-type]
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for item, (lp, tid, _), top in zip(content, want["output_token_logprobs"], want["output_top_logprobs"], strict=True):
        assert item.token == tok.decode([tid], skip_special_tokens=False)
        assert item.logprob == pytest.approx(lp, abs=1e-4)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([v for v, _, _ in top], abs=1e-4)
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-6)  # greedy took the best
    comp = client.completions.create(model=model_name, prompt=tok.decode(ids, skip_special_tokens=False), max_tokens=5,
                                     temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == 5 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in (lp.tokens or [])[:i]) for i in range(5)]


def test_seeded_sampling_and_n(client: openai.OpenAI, engine: Engine, tok: Tokenizer, model_name: str) -> None:
    ids = tok.encode_chat(MESSAGES)
    want = ref(engine, ids, max_new_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)["text"]
    kw: dict[str, Any] = {"model": model_name, "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": 1234,
                          "extra_body": {"ignore_eos": True}}
    assert client.chat.completions.create(**kw).choices[0].message.content == want
    first = client.chat.completions.create(n=3, **kw)
    again = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts[0] == want and len(set(texts)) > 1  # sample j uses seed + j, as sglang.Engine does
    assert first.usage is not None and (first.usage.prompt_tokens, first.usage.completion_tokens) == (len(ids), 30)
    streamed: dict[int, str] = {}
    for c in client.chat.completions.create(n=3, stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


# ---------------------------------------------------------------------------------------------
# Native /generate and gRPC
# ---------------------------------------------------------------------------------------------


def _sse(url: str, body: dict[str, Any]) -> list[Any]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
    events = []
    for raw in resp.read().decode().split("\n\n"):
        if raw.startswith("data: "):
            data = raw[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    conn.close()
    return events


def test_native_generate(router: RouterProc, engine: Engine, tok: Tokenizer) -> None:
    ids = tok.encode("Once upon a time")
    want = ref(engine, ids, max_new_tokens=6, **GREEDY)
    status, out, _ = http_json(router.url + "/generate", {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 6, **GREEDY}})
    assert status == 200 and (out["text"], out["output_ids"]) == (want["text"], want["output_ids"])
    meta = out["meta_info"]
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["finish_reason"]) == (len(ids), 6, {"type": "length"})
    status, outs, _ = http_json(router.url + "/generate", {
        "input_ids": [ids, ids[:3]], "sampling_params": {"max_new_tokens": 6, **GREEDY}, "return_logprob": True,
    })
    assert status == 200 and isinstance(outs, list) and outs[0]["output_ids"] == want["output_ids"]
    assert [e[1] for e in outs[0]["meta_info"]["output_token_logprobs"]] == want["output_ids"]
    events = _sse(router.url, {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 6, **GREEDY}, "stream": True})
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert (last["text"], last["output_ids"], last["meta_info"]["finish_reason"]) == (want["text"], want["output_ids"], {"type": "length"})
    lengths = [len(e["output_ids"]) for e in events[:-1]]
    assert lengths == sorted(lengths) and all(e["meta_info"]["finish_reason"] is None for e in events[:-2])
    status, bad, _ = http_json(router.url + "/generate", {"text": "x", "sampling_params": {"max_new_tokens": -2}})
    assert status == 400 and bad["error"]["param"] == "max_new_tokens"


def test_grpc_router_generate_and_list_models(router: RouterProc, engine: Engine, tok: Tokenizer, model_name: str) -> None:
    want = ref(engine, tok.encode_chat(MESSAGES), max_new_tokens=8, **GREEDY)

    async def body() -> None:
        async with RouterClient(router.grpc_addr) as rc:
            assert await rc.list_models() == [{"id": model_name, "context_length": 1024, "num_workers": 2}]
            params = {"max_new_tokens": 8, **GREEDY}
            events = [e async for e in rc.generate(RouterGenerateInput(messages=MESSAGES, sampling_params=params, stream=True))]
            assert [e.kind for e in events][-1] == "complete" and all(e.kind == "chunk" for e in events[:-1])
            assert "".join(e.text for e in events) == want["text"]
            assert events[-1].token_ids == want["output_ids"] and events[-1].finish_reason == {"type": "length"}
            assert events[-1].completion_tokens == 8 and events[-1].worker_id
            (done,) = [e async for e in rc.generate(RouterGenerateInput(input_ids=tok.encode_chat(MESSAGES), sampling_params=params))]
            assert (done.kind, done.text) == ("complete", want["text"])
            (err,) = [e async for e in rc.generate(RouterGenerateInput(text="x", sampling_params={"top_p": 5.0}))]
            assert (err.kind, err.error_code, err.error_param) == ("error", 400, "top_p")
            (err,) = [e async for e in rc.generate(RouterGenerateInput(model="nope", text="x"))]
            assert (err.kind, err.error_code, err.error_param) == ("error", 400, "model")

    asyncio.run(body())


# ---------------------------------------------------------------------------------------------
# Errors, auth, capacity, disconnects, metrics
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_a_400_naming_the_field_and_the_stack_keeps_serving(
    router: RouterProc, client: openai.OpenAI, model_name: str
) -> None:
    chat = router.url + "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    cases: list[tuple[Any, str | None]] = [
        (b"{not json", None),
        ({"model": model_name}, "messages"),
        ({"model": "no-such-model", "messages": msg}, "model"),
        ({"model": model_name, "messages": [{"role": "user", "content": "word " * 1200}]}, "messages"),
        ({"model": model_name, "messages": msg, "max_tokens": -5}, "max_tokens"),
        ({"model": model_name, "messages": msg, "temperature": "hot"}, "temperature"),
        ({"model": model_name, "messages": "hi"}, "messages"),
        ({"model": model_name, "messages": msg, "n": "2"}, "n"),
        ({"model": model_name, "messages": msg, "stop": 5}, "stop"),
    ]
    for body, param in cases:
        status, out, _ = http_json(chat, body)
        assert status == 400, (body, out)
        err = out["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param, (body, err)
        assert param is None or param in err["message"] or param == "model"
    status, out, _ = http_json(router.url + "/v1/completions", {"model": model_name, "prompt": list(range(5, 300)) * 4})
    assert status == 400 and out["error"]["param"] == "prompt" and out["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=msg, max_tokens=-1)  # type: ignore[arg-type]
    assert e.value.status_code == 400 and e.value.param == "max_tokens"  # type: ignore[attr-defined]
    ok = client.chat.completions.create(model=model_name, messages=msg, max_tokens=2)  # type: ignore[arg-type]
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert router.health()[0] == 200


def test_api_key_and_every_worker_full_gives_503_with_retry_after(strict_router: RouterProc, model_name: str) -> None:
    url = strict_router.url + "/v1/chat/completions"
    body = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, out, _ = http_json(url, body, headers)
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
    assert strict_router.health()[0] == 200  # health and metrics need no key
    assert "sglang_router:http_requests_total" in strict_router.metrics()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, out, _ = http_json(url, body, auth)
    assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
    # one request in flight per worker, 2 workers: the third sample of n=3 finds both full
    status, out, headers = http_json(url, {**body, "n": 3}, auth)
    assert status == 503 and headers.get("Retry-After") == "7"
    assert out["error"]["type"] == "service_unavailable" and out["error"]["code"] == "overloaded"
    good = openai.OpenAI(base_url=strict_router.url + "/v1", api_key=API_KEY, max_retries=0)
    assert good.chat.completions.create(model=model_name, messages=body["messages"], max_tokens=2).choices  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict_router.url + "/v1", api_key="nope", max_retries=0).models.list()


def _worker_metric(workers: list[WorkerProc], name: str) -> float:
    total = 0.0
    for w in workers:
        status, text, _ = http_json(f"http://{w.metrics_addr}/metrics", timeout_s=5)
        assert status == 200
        total += metric_value(text, name)
    return total


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request_on_the_worker(
    router: RouterProc, workers: list[WorkerProc], model_name: str, stream: bool
) -> None:
    # Start from idle workers, so "a worker runs it" below means this request and not a leftover
    # of an earlier test (the router cancels a request it has not dispatched without any abort).
    deadline = time.monotonic() + 20
    while _worker_metric(workers, "sglang:num_running_reqs") > 0:
        assert time.monotonic() < deadline, "workers never went idle"
        time.sleep(0.05)
    aborted = _worker_metric(workers, "sglang:num_aborted_requests_total")
    u = urllib.parse.urlsplit(router.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = {"model": model_name, "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 1000,
            "stream": stream, "ignore_eos": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    else:  # nothing comes back before the end: wait until a worker runs it
        deadline = time.monotonic() + 10
        while _worker_metric(workers, "sglang:num_running_reqs") < 1:
            assert time.monotonic() < deadline, "the request never reached a worker"
            time.sleep(0.01)
    conn.close()  # the client goes away
    deadline = time.monotonic() + 20
    while _worker_metric(workers, "sglang:num_aborted_requests_total") < aborted + 1:
        assert time.monotonic() < deadline, "the worker never aborted the request"
        time.sleep(0.05)
    generated = _worker_metric(workers, "sglang:generation_tokens_total")
    time.sleep(0.3)
    assert _worker_metric(workers, "sglang:generation_tokens_total") == generated  # nothing runs any more


def test_router_metrics(router: RouterProc, workers: list[WorkerProc]) -> None:
    text = router.metrics()
    per_worker = [metric_value(text, "sglang_router:requests_total", worker=w.worker_id, policy="cache_aware") for w in workers]
    assert sum(per_worker) > 10
    assert metric_value(text, "sglang_router:num_workers", role="unified") == 2
    assert metric_value(text, "sglang:time_to_first_token_seconds_count") > 0
    assert metric_value(text, "sglang:e2e_request_latency_seconds_count") > 0
    assert metric_value(text, "sglang:generation_tokens_total") > 50
    assert metric_value(text, "sglang_router:http_requests_total", route="/v1/chat/completions", status="400") >= 8
    assert metric_value(text, "sglang_router:requests_total", decision="cache_hit") > 0


# ---------------------------------------------------------------------------------------------
# Shared prefix index (Redis)
# ---------------------------------------------------------------------------------------------


def test_shared_prefix_index_matches_pages_across_replicas_and_evicts_lru(redis_url: str) -> None:
    async def body() -> None:
        r = aioredis.Redis.from_url(redis_url)
        a = SharedPrefixIndex(r, prefix="t-pidx", page_size=4, max_entries=6)
        b = SharedPrefixIndex(r, prefix="t-pidx", page_size=4, max_entries=6)  # another router replica
        await a.clear()
        assert page_hashes([1, 2, 3], 4) == [] and len(page_hashes(list(range(9)), 4)) == 2
        assert page_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != page_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)[1]  # chained
        await a.insert([1, 2, 3, 4, 5, 6, 7, 8, 9], "w1")  # 2 pages (the partial third is ignored)
        assert await b.match([1, 2, 3, 4, 5, 6, 7, 8, 0, 0], ["w1", "w2"]) == {"w1": 8, "w2": 0}
        assert await b.match([1, 2, 3, 4, 9, 9, 9, 9], ["w1", "w2"]) == {"w1": 4, "w2": 0}
        assert await b.match([9, 2, 3, 4, 5, 6, 7, 8], ["w1"]) == {"w1": 0}
        await b.insert([1, 2, 3, 4, 50, 51, 52, 53], "w2")
        assert await a.match([1, 2, 3, 4, 50, 51, 52, 53], ["w1", "w2"]) == {"w1": 4, "w2": 8}
        assert await a.num_entries() == 4
        await b.insert([1, 2, 3, 4, 5, 6, 7, 8], "w1")  # routed again: w1's pages are the most recent
        await a.insert([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], "w3")  # 3 more entries: 7 > 6
        assert await a.num_entries() == 6
        # the least recently routed entry went first: w2's deepest page
        assert await a.match([1, 2, 3, 4, 50, 51, 52, 53], ["w1", "w2"]) == {"w1": 4, "w2": 4}
        assert await a.match([1, 2, 3, 4, 5, 6, 7, 8], ["w1", "w2"]) == {"w1": 8, "w2": 4}
        assert await b.match(list(range(20, 32)), ["w3"]) == {"w3": 12}
        await a.clear()
        await r.aclose()

    asyncio.run(body())
