"""The SGLang README's frontend programs (examples/frontend) against a real mesh: redis-server, one
worker with a tiny random Llama and a ChatML tokenizer, one router, over HTTP with
``sgl.RuntimeEndpoint``; the same programs through ``sgl.OpenAI`` and the real openai client.
A random model writes garbage: the assertions are about structure, the constraints and the cache."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sglang as sgl
from sglang.engine.engine import Engine
from sglang.engine.tokenizer import Tokenizer

from examples.frontend import (
    batch_and_stream,
    json_decode,
    multi_turn_chat,
    regex_ip,
    tip_suggestion,
    tool_use,
)
from tests.helpers.mesh import one_worker_mesh
from tests.helpers.procs import REPO, WorkerProc, make_tiny_worker_model
from tests.helpers.router_procs import RouterProc, router_env

pytestmark = pytest.mark.e2e

PAGE = 16
WORKER_ARGS = ["--max-total-tokens", "8192", "--page-size", str(PAGE), "--heartbeat-interval-s", "0.5",
               "--heartbeat-ttl-s", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The largest tiny vocabulary: the README JSON fits in its max_tokens=256 with coarser tokens.
    return make_tiny_worker_model(tmp_path_factory.mktemp("tiny-lang"), vocab_size=1024)


@pytest.fixture(scope="module")
def mesh(model_dir: Path) -> Iterator[tuple[WorkerProc, RouterProc]]:
    with one_worker_mesh(model_dir, WORKER_ARGS) as pair:
        yield pair


@pytest.fixture(scope="module")
def router(mesh: tuple[WorkerProc, RouterProc]) -> Iterator[RouterProc]:
    saved = sgl.get_default_backend()
    sgl.set_default_backend(sgl.RuntimeEndpoint(mesh[1].url))
    yield mesh[1]
    sgl.set_default_backend(saved)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(str(model_dir))


def test_model_info_serves_the_chat_roles(router: RouterProc) -> None:
    backend = sgl.RuntimeEndpoint(router.url)
    assert backend.chat_roles() == {
        "system": ["<|im_start|>system\n", "<|im_end|>\n"], "user": ["<|im_start|>user\n", "<|im_end|>\n"],
        "assistant": ["<|im_start|>assistant\n", "<|im_end|>\n"], "stop_token_ids": [4],
    }


def test_multi_turn_chat(router: RouterProc, tokenizer: Tokenizer) -> None:
    state = multi_turn_chat.multi_turn_question.run(question_1="What is the capital of the United States?",
                                                    question_2="List two local attractions.")
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == state["answer_1"] and msgs[4]["content"] == state["answer_2"]
    assert state.text() == tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
    for name in ("answer_1", "answer_2"):
        meta = state.get_meta_info(name)
        assert 1 <= meta["completion_tokens"] <= 256 and meta["finish_reason"]["type"] in ("stop", "length")
    # The second turn's prompt starts with the first turn's text: served from the cache.
    assert state.get_meta_info("answer_2")["cached_tokens"] >= state.get_meta_info("answer_1")["prompt_tokens"] - PAGE


def test_tool_use_select_matches_the_in_process_engine(router: RouterProc, model_dir: Path) -> None:
    question = "What is the population of Paris times two?"
    state = tool_use.tool_use.run(question=question)
    assert state["tool"] in ("calculator", "search engine")
    follow = "expression" if state["tool"] == "calculator" else "word"
    prefix = f"To answer this question: {question}. I need to use a {state['tool']}. "
    assert state.text() == prefix + ("The math expression is" if follow == "expression" else
                                     "The key word to search is") + state[follow]
    scores = state.get_meta_info("tool")["normalized_prompt_logprobs"]
    with Engine(model_path=str(model_dir), device="cpu", dtype="float32", page_size=PAGE) as eng:
        local = tool_use.tool_use.run(question=question, backend=eng, max_new_tokens=1)
        assert local["tool"] == state["tool"]
        assert local.get_meta_info("tool")["normalized_prompt_logprobs"] == pytest.approx(scores, abs=1e-3)


def test_tip_suggestion_forks(router: RouterProc) -> None:
    state = tip_suggestion.tip_suggestion.run()
    head = "Here are two tips for staying healthy: 1. Balanced Diet. 2. Regular Exercise.\n\n"
    text = state.text()
    assert text.startswith(head + "Tip 1:")
    tips = re.fullmatch(re.escape(head) + r"Tip 1:(.*)\nTip 2:(.*)\nIn summary(.*)", text, re.S)
    assert tips is not None and tips.group(3) == state["summary"]
    assert all("\n\n" not in t for t in tips.groups()[:2])  # stop="\n\n"


def test_fork4_after_a_500_token_prefix_hits_the_cache(router: RouterProc, tokenizer: Tokenizer) -> None:
    prefix = ""
    while len(tokenizer.encode(prefix)) < 500:
        prefix += "A paged KV cache stores keys and values in fixed-size pages of memory. "
    n = len(tokenizer.encode(prefix))

    @sgl.function
    def fan_out(s):  # type: ignore[no-untyped-def]
        s += prefix
        forks = s.fork(4)
        for i, f in enumerate(forks):
            f += f"Branch {i}:" + sgl.gen("out", max_tokens=4)
        return [f.get_meta_info("out")["cached_tokens"] for f in forks]

    cached = fan_out.run().ret_value
    print(f"fork(4) after a {n}-token prefix, page {PAGE}: cached_tokens {cached}")
    assert all(c >= n - PAGE for c in cached[1:]), (cached, n)


def test_regex_ip(router: RouterProc) -> None:
    answer = regex_ip.regular_expression_gen.run()["answer"]
    assert re.fullmatch(regex_ip.IP_REGEX, answer), answer


def test_harry_potter_json_regex(router: RouterProc) -> None:
    out = json_decode.character_gen.run(name="Hermione Granger")["json_output"]
    assert re.fullmatch(json_decode.character_regex, out), out


def test_run_batch_and_streaming(router: RouterProc) -> None:
    states = batch_and_stream.text_qa.run_batch(batch_and_stream.QUESTIONS, progress_bar=True)
    assert len(states) == 3
    for q, st in zip(batch_and_stream.QUESTIONS, states, strict=True):
        assert "\n" not in st["answer"]
        assert st.text() == "Q: " + q["question"] + "\nA:" + st["answer"]
    state = batch_and_stream.text_qa.run(question="What is the capital of France?", temperature=0.1, stream=True)
    pieces = list(state.text_iter())
    assert "".join(pieces) == state.text() and len(pieces) >= 3


def test_example_script_runs_against_the_router_url(router: RouterProc) -> None:
    out = subprocess.run([sys.executable, str(REPO / "examples/frontend/tool_use.py"), "--url", router.url],
                         capture_output=True, text=True, env=router_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("To answer this question: What is the population of Paris times two?. I need to use a ")


def test_openai_backend_through_the_router(router: RouterProc) -> None:
    import openai

    model = sgl.RuntimeEndpoint(router.url).model_name
    backend = sgl.OpenAI(model, base_url=router.url + "/v1", api_key="unused", choices_method="match")
    state = multi_turn_chat.multi_turn_question.run(question_1="Hi?", question_2="Bye?", temperature=0,
                                                    backend=backend)
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    direct = openai.OpenAI(base_url=router.url + "/v1", api_key="unused").chat.completions.create(
        model=model, messages=msgs[:4], max_tokens=256, temperature=0)  # type: ignore[arg-type]
    assert state["answer_2"] == direct.choices[0].message.content
    assert state.get_meta_info("answer_2")["completion_tokens"] == direct.usage.completion_tokens  # type: ignore[union-attr]

    @sgl.function
    def pick(s):  # type: ignore[no-untyped-def]
        s += sgl.user("Calculator or search engine?")
        s += sgl.assistant(sgl.select("tool", choices=["calculator", "search engine"]))

    assert pick.run(backend=backend)["tool"] in ("calculator", "search engine")
    constrained = sgl.OpenAI(model, base_url=router.url + "/v1", api_key="unused")  # regex (choice1|choice2)
    st = pick.run(backend=constrained)
    assert st.get_meta_info("tool")["answer"] == st["tool"] in ("calculator", "search engine")

    @sgl.function
    def not_in_turn(s):  # type: ignore[no-untyped-def]
        s += "plain text " + sgl.gen("x", max_tokens=2)

    with pytest.raises(ValueError, match="must be the whole content of an assistant turn"):
        not_in_turn.run(backend=backend)
    dead = sgl.OpenAI(model, base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0)
    with pytest.raises(ConnectionError, match=r"http://127.0.0.1:9/v1"):
        multi_turn_chat.multi_turn_question.run(question_1="a", question_2="b", backend=dead)


def test_server_errors_reach_the_program(router: RouterProc) -> None:
    @sgl.function
    def bad(s):  # type: ignore[no-untyped-def]
        s += "x" + sgl.gen("y", top_p=1.5)

    with pytest.raises(sgl.ServerError, match="400.*top_p"):
        bad.run()
    with pytest.raises(sgl.ServerError, match="404|model"):
        sgl.RuntimeEndpoint(router.url, model="no-such-model")
