"""Prefill/decode disaggregation end to end: a real redis-server, real worker processes
(``--role prefill``, ``--role decode``, ``--role unified``) moving KV pages over NIXL (UCX on DRAM,
``UCX_NET_DEVICES=lo``), real routers, the real ``openai`` client.

- greedy chat completions (32 concurrent, mixed lengths, streamed and not) through the PD router are
  identical to those of a router over a unified worker (``--pd-mode off``); the second pass hits the
  prefill worker's prefix cache; the workers export SGLang's PD metrics;
- roles: each worker serves only its RPC (``Generate``/``Prefill``/``Decode``) and registers its role;
- a decode worker with another page_size is refused at pairing time, naming the field;
- ``sglang up --prefill 1 --decode 1`` serves the same answer;
- ``kill -9`` of the prefill worker mid-transfer (held by the test hook below): the client gets a
  clean 503 within 5 s and the decode worker has all its pages back within 5 s. It runs last.

Test hook: the prefill worker runs with ``SGLANG_TEST_PD_CHUNK_DELAY_S=0.5`` and
``SGLANG_TEST_PD_CHUNK_DELAY_MIN_PROMPT=400``: after each KV chunk (``--chunked-prefill-size 64``)
of a prompt of at least 400 tokens it sleeps 0.5 s, so a 640-token prompt stays mid-transfer for
about 4 s. Shorter prompts are not delayed.

Exact greedy equality is only valid where greedy decoding has a clear winner. PD and unified batch
different requests together, and the torch_native decode pads the batch to its longest context, so
the float32 reduction order (and the logits, by up to ~5e-6 in logprob on this model) depends on
which requests share a step. With the old model seed, conversation 12 had a top-2 logprob gap of
1.9e-6 at its 11th output token and flipped between two continuations (token 254 vs 71) from run to
run, in the unified reference as well as through PD. The tiny model's seed (``MODEL_SEED``) is chosen
so that every conversation's greedy path (20 tokens, more than any budget here) has a top-2 gap of
at least ``MIN_TOP2_GAP``; ``greedy_margins`` measures it with an in-process engine and the
comparison tests assert it, so a change of model, prompts or budgets that brings back a near-tie
fails loudly instead of flaking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from sglang.transport.types import GenerateInput
from sglang.transport.worker_client import WorkerClient

from tests.helpers.procs import REPO, WorkerProc, make_tiny_worker_model, spawn_worker, worker_env
from tests.helpers.redis_server import free_port, start_redis
from tests.helpers.router_procs import RouterProc, http_json, metric_value, spawn_router

pytestmark = pytest.mark.e2e

PD_ENV = {"UCX_NET_DEVICES": "lo"}
HOLD_ENV = {"SGLANG_TEST_PD_CHUNK_DELAY_S": "0.5", "SGLANG_TEST_PD_CHUNK_DELAY_MIN_PROMPT": "400"}
# Same chunking everywhere, so that prefill and unified compute the prompt's KV the same way.
COMMON = ["--max-total-tokens", "16384", "--chunked-prefill-size", "64", "--heartbeat-interval-s", "0.5",
          "--heartbeat-ttl-s", "2.0"]
ROUTER_ARGS = ["--discovery-interval-s", "0.2", "--pd-abort-timeout-s", "1.0"]

MODEL_SEED = 1  # seed 0 has a near-tie (gap 1.9e-6) on conversation 12; see the module docstring
MIN_TOP2_GAP = 1e-4  # 20x the batch-composition noise measured on the logprobs (<= 5e-6)
GAP_TOKENS = 20  # > every max_tokens used with conversations() below

BASE = "Arr, the sea is wide and the rum is gone; hoist the sails and sing. "
QUESTIONS = ["How are you?", "Name a color.", "Count to three.", "Where is the ship?"]


def conversations() -> list[list[dict[str, str]]]:
    """32 chats of mixed lengths (about 15 to 300 prompt tokens); families share system prompts."""
    out = []
    for i in range(32):
        system = f"You are pirate number {i % 4}. " + BASE * (i % 5)
        out.append([{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % 4] * (1 + i % 3)}])
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_worker_model(tmp_path_factory.mktemp("tiny-pd"), seed=MODEL_SEED)


@pytest.fixture(scope="module")
def greedy_margins(model_dir: Path) -> list[float]:
    """Per conversation, the smallest top-2 logprob gap along its greedy path (in-process engine,
    same page size and chunking as the workers)."""
    import sglang

    eng = sglang.Engine(model_path=str(model_dir), max_total_tokens=16384, chunked_prefill_size=64)
    try:
        assert eng.tokenizer is not None
        ids = [eng.tokenizer.encode_chat(c) for c in conversations()]
        outs = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": GAP_TOKENS, "temperature": 0},
                            return_logprob=True, top_logprobs_num=2)
    finally:
        eng.shutdown()
    return [min(top[0][0] - top[1][0] for top in o["meta_info"]["output_top_logprobs"]) for o in outs]


def assert_no_near_ties(margins: list[float], convs: range) -> None:
    close = {i: margins[i] for i in convs if margins[i] < MIN_TOP2_GAP}
    assert not close, f"greedy near-ties (conversation: top-2 gap) make exact equality flaky: {close}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url, stop = start_redis()
    yield url
    stop()


class Mesh:
    def __init__(self, workers: dict[str, WorkerProc], routers: dict[str, RouterProc]) -> None:
        self.w = workers
        self.r = routers


@pytest.fixture(scope="module")
def mesh(redis_url: str, model_dir: Path) -> Iterator[Mesh]:
    """prefill + decode + unified workers in one registry; a decode worker with page_size 1 in
    another (prefix ``mm``); a PD router and a unified-only router (``--pd-mode off``)."""
    base = ["--redis-url", redis_url, "--model-path", str(model_dir), *COMMON]
    specs = {
        "prefill": (["--role", "prefill"], {**PD_ENV, **HOLD_ENV}),
        "decode": (["--role", "decode"], PD_ENV),
        "unified": (["--role", "unified"], {}),
        "decode_p1": (["--role", "decode", "--page-size", "1", "--redis-prefix", "mm"], PD_ENV),
    }
    wprocs = {name: spawn_worker([*base, *args, "--metrics-port", "0"], env=env, wait=False)
              for name, (args, env) in specs.items()}
    rargs = ["--redis-url", redis_url, *ROUTER_ARGS]
    rprocs = {"pd": spawn_router(rargs, wait=False), "unified": spawn_router([*rargs, "--pd-mode", "off"], wait=False)}
    try:
        ws = {name: p.wait_ready(120) for name, p in wprocs.items()}
        rs = {name: p.wait_ready().wait_healthy(workers=3, timeout_s=120) for name, p in rprocs.items()}
        yield Mesh(ws, rs)
    finally:
        for r in rprocs.values():
            r.terminate()
        for w in wprocs.values():
            w.terminate()
        for r in rprocs.values():
            r.stop()
        for w in wprocs.values():
            try:
                w.wait(20)
            except subprocess.TimeoutExpired:
                w.kill()
            w.stop(timeout_s=1)


def oai(router: RouterProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def model_id(router: RouterProc) -> str:
    return next(iter(oai(router).models.list())).id


def chat(router: RouterProc, messages: list[dict[str, str]], max_tokens: int, stream: bool = False) -> tuple[str, str, int]:
    """(text, finish_reason, cached_tokens) of one greedy chat completion."""
    client = oai(router)
    kw: dict[str, Any] = {"model": model_id(router), "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        text, finish = "", ""
        for chunk in client.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish, -1
    resp = client.chat.completions.create(**kw)
    cached = resp.usage.prompt_tokens_details.cached_tokens if resp.usage and resp.usage.prompt_tokens_details else 0
    return resp.choices[0].message.content or "", resp.choices[0].finish_reason, cached or 0


def all_chats(router: RouterProc, stream: bool = False) -> list[tuple[str, str, int]]:
    convs = conversations()
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        futs = [pool.submit(chat, router, c, 3 + (i * 7) % 17, stream) for i, c in enumerate(convs)]
        return [f.result(timeout=120) for f in futs]


def load(worker: WorkerProc) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with WorkerClient(worker.addr) as c:
            return await c.get_load(timeout_s=5)

    return asyncio.run(go())


def worker_metrics(worker: WorkerProc) -> str:
    status, body, _ = http_json(f"http://{worker.metrics_addr}/metrics", timeout_s=5)
    assert status == 200
    return str(body)


def test_pd_greedy_output_equals_unified(mesh: Mesh, greedy_margins: list[float]) -> None:
    assert_no_near_ties(greedy_margins, range(32))
    ref = all_chats(mesh.r["unified"])
    assert len({t for t, _, _ in ref}) > 8  # the prompts really differ
    cold = all_chats(mesh.r["pd"])
    warm = all_chats(mesh.r["pd"])
    streamed = all_chats(mesh.r["pd"], stream=True)
    for i, (want, c, w, s) in enumerate(zip(ref, cold, warm, streamed, strict=True)):
        assert c[:2] == want[:2] and w[:2] == want[:2] and s[:2] == want[:2], (i, want, c, w, s)
    assert sum(w[2] for w in warm) > sum(c[2] for c in cold)
    assert all(w[2] > 0 for w in warm)  # every prompt was prefilled before: a prefix hit

    pd_text, uni_text = mesh.r["pd"].metrics(), mesh.r["unified"].metrics()
    p, d, u = (mesh.w[n].worker_id for n in ("prefill", "decode", "unified"))
    assert metric_value(pd_text, "sglang_router:requests_total", worker=p) == 96
    assert metric_value(pd_text, "sglang_router:requests_total", worker=d, policy="pd_decode") == 96
    assert metric_value(pd_text, "sglang_router:requests_total", worker=u) == 0
    assert metric_value(uni_text, "sglang_router:requests_total", worker=u) == 32
    assert metric_value(pd_text, "sglang_router:pd_failures_total") == 0

    deadline = time.monotonic() + 5  # the workers refresh their gauges every heartbeat (0.5 s)
    while True:
        pm, dm = worker_metrics(mesh.w["prefill"]), worker_metrics(mesh.w["decode"])
        done = min(metric_value(pm, "sglang:kv_transfer_reqs_total"), metric_value(dm, "sglang:kv_transfer_reqs_total"))
        if done >= 96 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert metric_value(pm, "sglang:kv_transfer_reqs_total") == 96
    assert metric_value(dm, "sglang:kv_transfer_reqs_total") == 96
    assert metric_value(pm, "sglang:kv_transfer_bytes_total") > 0
    assert metric_value(pm, "sglang:kv_transfer_speed_gb_s") > 0
    assert metric_value(pm, "sglang:kv_transfer_latency_ms") > 0
    assert metric_value(pm, "sglang:num_transfer_failed_reqs_total") == 0
    for name in ("sglang:num_prefill_inflight_queue_reqs", "sglang:num_decode_prealloc_queue_reqs",
                 "sglang:num_decode_transfer_queue_reqs"):
        assert f"{name}{{" in dm, name
    assert load(mesh.w["decode"])["num_used_pages"] == 0


def test_roles_serve_only_their_rpc(mesh: Mesh, redis_url: str) -> None:
    async def go() -> dict[str, Any]:
        got: dict[str, Any] = {}
        for name in ("prefill", "decode", "unified"):
            async with WorkerClient(mesh.w[name].addr) as c:
                got[name] = (await c.get_model_info())["role"]
                inp = GenerateInput(request_id=f"r-{name}", input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2},
                                    bootstrap_room=12345)
                wrong = c.generate if name == "prefill" else c.prefill  # an RPC of another role
                got[f"{name}-wrong"] = [ev async for ev in wrong(inp)][-1]
        return got

    got = asyncio.run(go())
    assert (got["prefill"], got["decode"], got["unified"]) == ("prefill", "decode", "unified")
    for name in ("prefill", "decode", "unified"):
        ev = got[f"{name}-wrong"]
        assert ev.kind == "error" and ev.error_code == 400 and ev.error_param == "role", ev
        assert f"role {name!r}" in ev.error_message
    status, health, _ = http_json(mesh.r["pd"].url + "/health")
    assert status == 200 and health["workers"] == 3

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        roles = {mesh.w[n].worker_id: n for n in ("prefill", "decode", "unified")}
        for wid, role in roles.items():
            raw = client.get(f"sglang:worker:{wid}")
            assert raw is not None and f'"role": "{role}"' in raw.decode()
    finally:
        client.close()


def test_incompatible_decode_is_refused_naming_the_field(mesh: Mesh) -> None:
    """prefill (page_size 16) paired by hand with the decode worker of page_size 1."""

    async def go() -> tuple[Any, Any, float]:
        room = 424242
        inp = GenerateInput(request_id="mismatch", input_ids=list(range(3, 60)), sampling_params={"max_new_tokens": 4},
                            bootstrap_room=room, stream=False)
        async with WorkerClient(mesh.w["prefill"].addr) as p, WorkerClient(mesh.w["decode_p1"].addr) as d:
            t0 = time.monotonic()

            async def last(stream: Any) -> Any:
                return [ev async for ev in stream][-1]

            pe, de = await asyncio.wait_for(asyncio.gather(last(p.prefill(inp)), last(d.decode(inp))), 10)
            return pe, de, time.monotonic() - t0

    pe, de, elapsed = asyncio.run(go())
    for ev in (pe, de):
        assert ev.kind == "complete" and ev.finish_reason["type"] == "abort", ev
        assert "page_size: prefill 16 != decode 1" in ev.finish_reason["message"], ev
    assert elapsed < 5.0
    assert load(mesh.w["decode_p1"])["num_used_pages"] == 0
    assert load(mesh.w["prefill"])["num_used_pages"] == 0


READY = re.compile(r"sglang up: ready at (http://\S+)")


def test_sglang_up_prefill_decode(mesh: Mesh, model_dir: Path, greedy_margins: list[float]) -> None:
    assert_no_near_ties(greedy_margins, range(4))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang.cli", "up", "--prefill", "1", "--decode", "1", "--model-path", str(model_dir),
         "--port", str(port), "--max-total-tokens", "4096", "--stop-timeout", "15"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env=worker_env({"PYTHONUNBUFFERED": "1"}), cwd=str(REPO), start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if READY.search(line):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120) and proc.poll() is None, "\n".join(lines[-40:])
        assert any("1 prefill worker(s), 1 decode worker(s)" in line for line in lines), "\n".join(lines[-10:])
        up = RouterProc(proc=proc, stderr_path="", url=f"http://127.0.0.1:{port}")
        convs = conversations()[:4]
        assert [chat(up, c, 6)[:2] for c in convs] == [chat(mesh.r["unified"], c, 6)[:2] for c in convs]
        assert metric_value(up.metrics(), "sglang_router:num_workers", role="prefill") == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait(10)
    assert rc == 0, "\n".join(lines[-30:])


def test_kill_9_prefill_mid_transfer_fails_cleanly_and_frees_decode_pages(mesh: Mesh) -> None:
    """Runs last: it kills the module's prefill worker."""
    router, decode, prefill = mesh.r["pd"], mesh.w["decode"], mesh.w["prefill"]
    prompt = [3 + (i * 7) % 300 for i in range(640)]  # >= 400 tokens: held 0.5 s after each 64-token chunk
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            oai(router).completions.create(model=model_id(router), prompt=prompt, max_tokens=4, temperature=0)
            result["ok"] = True
        except openai.APIStatusError as e:
            result["error"] = e
        result["at"] = time.monotonic()

    t = threading.Thread(target=call, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while load(decode)["num_decode_transfer_queue_reqs"] != 1:  # pages reserved and published
        assert time.monotonic() < deadline and t.is_alive(), result
        time.sleep(0.05)
    time.sleep(0.7)  # a chunk or two were written; the prefill sleeps before the next one
    assert load(decode)["num_used_pages"] > 0
    os.kill(prefill.pid, signal.SIGKILL)
    killed = time.monotonic()

    t.join(timeout=10)
    assert not t.is_alive(), "the client is still waiting"
    err = result.get("error")
    assert err is not None, result
    assert result["at"] - killed < 5.0
    assert err.status_code == 503
    assert f"prefill worker {prefill.worker_id}" in str(err), str(err)

    while True:  # the decode worker freed the reserved pages (the router aborted the request)
        got = load(decode)
        if got["num_used_pages"] == 0 and got["num_decode_transfer_queue_reqs"] == 0:
            break
        assert time.monotonic() - killed < 5.0, got
        time.sleep(0.05)
    assert metric_value(router.metrics(), "sglang_router:pd_failures_total", stage="prefill") == 1
    prefill.proc.wait(timeout=5)
