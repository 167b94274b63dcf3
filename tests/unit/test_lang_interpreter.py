"""The frontend interpreter on an in-process ``sglang.Engine`` (tiny random Llama, tiny ChatML
tokenizer): text and variables, roles rendered by the model's chat template, fork/join, the fork
prefix in the radix cache, select scored by prompt logprobs, streaming, run_batch, errors."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sglang as sgl
from sglang.engine.engine import Engine

from tests.helpers.procs import make_tiny_worker_model

pytestmark = pytest.mark.unit

PAGE = 16
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = make_tiny_worker_model(tmp_path_factory.mktemp("lang-tiny"))
    eng = Engine(model_path=str(path), device="cpu", dtype="float32", page_size=PAGE, max_total_tokens=8192)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def backend(engine: Engine) -> sgl.EngineBackend:
    return sgl.EngineBackend(engine)


@sgl.function
def qa(s, question):  # type: ignore[no-untyped-def]
    s += "Q: " + question + "\nA:"
    s += sgl.gen("answer", max_tokens=6, ignore_eos=True)
    s += " and" + sgl.gen("more", max_tokens=3, ignore_eos=True)


def test_text_and_variables_accumulate_greedily(engine: Engine, backend: sgl.EngineBackend) -> None:
    st = qa.run(question="What is 1+1?", temperature=0, backend=backend)
    head = "Q: What is 1+1?\nA:"
    ref = engine.generate(prompt=head, sampling_params={**GREEDY, "max_new_tokens": 6})
    assert isinstance(ref, dict)
    assert st["answer"] == ref["text"]
    assert st.text() == head + st["answer"] + " and" + st["more"]
    meta = st.get_meta_info("answer")
    assert meta["completion_tokens"] == 6 and meta["finish_reason"] == {"type": "length"}
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode(head))
    assert st.get_meta_info("more")["completion_tokens"] == 3
    assert "answer" in st and "nope" not in st


def test_engine_instance_is_accepted_as_backend(engine: Engine) -> None:
    st = qa.run(question="hi", temperature=0, backend=engine)
    assert st.text().startswith("Q: hi\nA:") and len(st["more"]) > 0


def test_roles_render_with_the_models_chat_template(engine: Engine, backend: sgl.EngineBackend) -> None:
    @sgl.function
    def chat(s):  # type: ignore[no-untyped-def]
        s += sgl.system("Be brief.")
        s += sgl.user("Name a color.")
        s += sgl.assistant(sgl.gen("a1", max_tokens=4))
        s += sgl.user_begin() + "Another?" + sgl.user_end()
        s += sgl.assistant_begin() + "Sure: " + sgl.gen("a2", max_tokens=4) + sgl.assistant_end()

    st = chat.run(temperature=0, ignore_eos=True, backend=backend)
    msgs = st.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == st["a1"] and msgs[4]["content"] == "Sure: " + st["a2"]
    assert st.text() == engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
    # The first answer was generated from the template's own generation prompt.
    prompt = engine.tokenizer.apply_chat_template(msgs[:2], add_generation_prompt=True)
    ref = engine.generate(prompt=prompt, sampling_params={**GREEDY, "max_new_tokens": 4})
    assert isinstance(ref, dict) and st["a1"] == ref["text"]


def test_fork_join_text_and_variables(backend: sgl.EngineBackend) -> None:
    @sgl.function
    def branches(s):  # type: ignore[no-untyped-def]
        s += "Root. "
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"Branch {i}:"
            f += sgl.gen("leaf", max_tokens=2, ignore_eos=True)
        s += "after fork. "
        forks.join(mode="concate_join")
        return forks

    st = branches.run(temperature=0, backend=backend)
    forks = st.ret_value
    assert len(forks) == 3
    leaves = [forks[i]["leaf"] for i in range(3)]
    for i, f in enumerate(forks):
        assert f.text() == f"Root. Branch {i}:" + leaves[i]
    assert st["leaf"] == leaves  # gathered in fork order
    assert st.text() == "Root. after fork. " + "".join(f"Branch {i}:" + leaves[i] for i in range(3))


def test_fork_branches_share_a_long_prefix_in_the_radix_cache(engine: Engine, backend: sgl.EngineBackend) -> None:
    prefix = ""
    while len(engine.tokenizer.encode(prefix)) < 500:
        prefix += "The scheduler batches requests; the radix cache shares their prefixes. "
    n_prefix = len(engine.tokenizer.encode(prefix))
    assert 500 <= n_prefix < 600

    @sgl.function
    def fan_out(s):  # type: ignore[no-untyped-def]
        s += prefix
        forks = s.fork(4)
        for i, f in enumerate(forks):
            f += f"Q{i}:" + sgl.gen("out", max_tokens=2, ignore_eos=True)
        return [f.get_meta_info("out") for f in forks]

    metas = fan_out.run(temperature=0, backend=backend).ret_value
    cached = [m["cached_tokens"] for m in metas]
    assert all(c >= n_prefix - PAGE for c in cached[1:]), (cached, n_prefix)
    assert all(m["prompt_tokens"] > n_prefix for m in metas)


def test_forks_run_in_parallel(backend: sgl.EngineBackend) -> None:
    both_inside = threading.Barrier(2, timeout=20)  # broken unless both forks call at the same time
    inner = backend.generate

    def spy(inp, params):  # type: ignore[no-untyped-def]
        both_inside.wait()
        return inner(inp, params)

    backend.generate = spy  # type: ignore[method-assign]
    try:
        @sgl.function
        def two(s):  # type: ignore[no-untyped-def]
            s += "x"
            forks = s.fork(2)
            forks += sgl.gen("y", max_tokens=1)
            forks.join()

        assert len(two.run(backend=backend)["y"]) == 2
    finally:
        del backend.generate
    assert not both_inside.broken


def test_select_scores_mean_token_logprobs(engine: Engine, backend: sgl.EngineBackend) -> None:
    choices = ["calculator", "search engine", "a web browser"]

    @sgl.function
    def tool(s):  # type: ignore[no-untyped-def]
        s += "To answer this question I need to use a"
        s += sgl.gen("first", max_tokens=3, ignore_eos=True)
        s += " or a " + sgl.select("tool", choices=choices)

    st = tool.run(temperature=0, backend=backend)
    prefix = "To answer this question I need to use a" + st["first"] + " or a "
    # Independent reference: score every choice alone, all prompt logprobs, no batching.
    tok = engine.tokenizer
    prefix_ids = tok.encode(prefix)
    means = []
    for c in choices:
        ids = tok.encode(prefix + c)
        common = next(i for i, (a, b) in enumerate(zip(ids, prefix_ids + [-1], strict=False)) if a != b)
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                              logprob_start_len=0)
        assert isinstance(out, dict)
        lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]
        means.append(sum(lps[common:]) / (len(ids) - common))  # the tokens that are not the prefix's
    meta = st.get_meta_info("tool")
    assert meta["normalized_prompt_logprobs"] == pytest.approx(means, abs=1e-4)
    best = max(range(3), key=lambda i: means[i])
    assert st["tool"] == choices[best] and st.text() == prefix + choices[best]
    assert len(meta["choices_meta_info"]) == 3
    assert all(m["cached_tokens"] > 0 for m in meta["choices_meta_info"])  # the prefix came from the cache


def test_streaming_text_iter_and_async_iter(backend: sgl.EngineBackend) -> None:
    st = qa.run(question="Stream?", temperature=0, stream=True, backend=backend)
    pieces = list(st.text_iter())
    assert "".join(pieces) == st.text() and len(pieces) >= 4
    assert "".join(st.text_iter("answer")) == st["answer"]

    async def collect() -> list[str]:
        st2 = qa.run(question="Stream?", temperature=0, stream=True, backend=backend)
        return [p async for p in st2.text_async_iter("more")]

    assert "".join(asyncio.run(collect())) == st["more"]


def test_run_batch_keeps_order(backend: sgl.EngineBackend) -> None:
    questions = [f"Question number {i}?" for i in range(5)]
    states = qa.run_batch([{"question": q} for q in questions], temperature=0, num_threads=3, backend=backend)
    assert [s.text().split("\n")[0] for s in states] == [f"Q: {q}" for q in questions]
    singles = [qa.run(question=q, temperature=0, backend=backend)["answer"] for q in questions[:2]]
    assert [s["answer"] for s in states[:2]] == singles
    with pytest.raises(ValueError, match="num_threads must be 'auto' or a positive int"):
        qa.run_batch([{"question": "x"}], num_threads=0, backend=backend)
    with pytest.raises(TypeError, match="list of dicts"):
        qa.run_batch(["x"], backend=backend)  # type: ignore[list-item]


def test_unknown_variable_names_it_and_lists_the_known_ones(backend: sgl.EngineBackend) -> None:
    st = qa.run(question="hi", max_new_tokens=1, backend=backend)
    with pytest.raises(KeyError, match=r"no variable 'answr' in this program state; known variables: \['answer', 'more'\]"):
        st["answr"]
    with pytest.raises(KeyError, match="'nothing'"):
        list(st.text_iter("nothing"))


def test_image_on_a_text_only_model_is_a_clear_error(backend: sgl.EngineBackend, tmp_path: Path) -> None:
    img = tmp_path / "cat.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n")

    @sgl.function
    def look(s):  # type: ignore[no-untyped-def]
        s += sgl.user(sgl.image(str(img)) + "What is this?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=2))

    with pytest.raises(ValueError, match="this model has no vision encoder; sgl.image needs a vision-language model"):
        look.run(backend=backend)


def test_program_errors_are_raised_to_the_caller(backend: sgl.EngineBackend) -> None:
    @sgl.function
    def bad_role(s):  # type: ignore[no-untyped-def]
        s += sgl.user_begin() + "hi" + sgl.assistant_end()

    with pytest.raises(ValueError, match=r"sgl.assistant_end\(\) without a matching sgl.assistant_begin\(\)"):
        bad_role.run(backend=backend)

    @sgl.function
    def bad_param(s):  # type: ignore[no-untyped-def]
        s += "x" + sgl.gen("y", top_p=1.5)
        s += "never reached" + sgl.gen("z")

    with pytest.raises(ValueError, match="top_p"):
        bad_param.run(backend=backend)
    st = bad_param.run(backend=backend, stream=True)
    with pytest.raises(ValueError, match="top_p"):
        list(st.text_iter())


def test_no_backend_and_unreachable_backend() -> None:
    @sgl.function
    def p(s):  # type: ignore[no-untyped-def]
        s += "x"

    saved = sgl.get_default_backend()
    try:
        sgl.set_default_backend(None)
        with pytest.raises(ValueError, match="no backend: pass backend="):
            p.run()
    finally:
        sgl.set_default_backend(saved)
    with pytest.raises(ConnectionError, match=r"cannot reach the SGLang server at http://127.0.0.1:9"):
        sgl.RuntimeEndpoint("http://127.0.0.1:9")
    with pytest.raises(TypeError, match="a backend must be"):
        p.run(backend="http://127.0.0.1:9")


def test_constrained_gen_dtype_int_and_choices_in_a_role(backend: sgl.EngineBackend) -> None:
    @sgl.function
    def typed(s):  # type: ignore[no-untyped-def]
        s += "Pick a number: " + sgl.gen("n", dtype=int, max_tokens=6, temperature=0)
        s += sgl.user("Yes or no?") + sgl.assistant(sgl.gen("yn", choices=["yes", "no"]))

    st = typed.run(backend=backend)
    assert re.fullmatch(r"[-+]?[0-9]+", st["n"]), st["n"]
    assert st["yn"] in ("yes", "no") and st.messages()[-1] == {"role": "assistant", "content": st["yn"]}
