"""sglang.Engine behaviour: logprobs, bad input, abort, n/seed, continuous batching, stopping.

Every test ends with the allocator's integrity check and no page in use.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sglang.engine.engine import Engine

from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration

VOCAB = 256
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), vocab_size=VOCAB, seed=3)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine(
        model_path=str(model_dir), skip_tokenizer_init=True, device="cpu", dtype="float32",
        page_size=4, chunked_prefill_size=16, max_total_tokens=4096,
    )
    yield eng
    eng.shutdown()


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engine" in request.fixturenames:
        eng: Engine = request.getfixturevalue("engine")
        deadline = time.time() + 10
        while eng.get_stats()["num_used_pages"] and time.time() < deadline:
            time.sleep(0.01)
        eng.check_integrity()
        assert eng.get_stats()["num_used_pages"] == 0


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def _hf_logsoftmax(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def test_logprobs_match_hf(engine: Engine, model_dir: Path) -> None:
    prompt = _prompt(40, seed=1)  # 40 tokens: three prefill chunks of 16
    out = engine.generate(
        input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 6},
        return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
    )
    assert isinstance(out, dict)
    meta = out["meta_info"]
    ids = prompt + out["output_ids"]
    ref = _hf_logsoftmax(model_dir, ids)
    inp = meta["input_token_logprobs"]
    assert len(inp) == len(prompt)
    assert inp[0] == (None, prompt[0], None)
    for j in range(1, len(prompt)):
        lp, tok, _ = inp[j]
        assert tok == prompt[j]
        assert abs(lp - ref[j - 1, tok].item()) < 1e-4
    outs = meta["output_token_logprobs"]
    assert [t for _, t, _ in outs] == out["output_ids"]
    for i, (lp, tok, _) in enumerate(outs):
        assert abs(lp - ref[len(prompt) - 1 + i, tok].item()) < 1e-4
        # Greedy: the chosen token is the top-1 of the raw distribution.
        top = meta["output_top_logprobs"][i]
        assert len(top) == 3 and top[0][1] == tok
        ref_top = torch.topk(ref[len(prompt) - 1 + i], 3)
        assert [t for _, t, _ in top] == ref_top.indices.tolist()
        assert all(abs(v - r) < 1e-4 for (v, _, _), r in zip(top, ref_top.values.tolist(), strict=True))
    assert meta["input_top_logprobs"][0] is None
    assert [t for _, t, _ in meta["input_top_logprobs"][5]] == torch.topk(ref[4], 3).indices.tolist()


def test_prompt_logprobs_from_start_len(engine: Engine, model_dir: Path) -> None:
    prompt = _prompt(20, seed=2)
    out = engine.generate(
        input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 0}, return_logprob=True, logprob_start_len=15
    )
    assert isinstance(out, dict)
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length"}
    ref = _hf_logsoftmax(model_dir, prompt)
    inp = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in inp] == prompt[15:]
    for k, (lp, tok, _) in enumerate(inp):
        assert abs(lp - ref[15 + k - 1, tok].item()) < 1e-4


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1] * 1024}, "context length"),
        ({"input_ids": [VOCAB + 5]}, "input_ids"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"top_p": 0.0}}, "top_p"),
        ({"input_ids": [1], "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"input_ids": [1], "sampling_params": {"temperature": -0.5}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"max_tokens": 5}}, "max_tokens"),
        ({"input_ids": [1], "sampling_params": {"temperature": "hot"}}, "temperature"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}, {"top_k": 0}]}, "top_k"),
        ({"prompt": "hello"}, "tokenizer"),
        ({}, "prompt or input_ids"),
    ],
)
def test_bad_input_raises_and_engine_keeps_serving(engine: Engine, kwargs: dict, needle: str) -> None:
    # Another request is in flight while the bad one is rejected; it must finish normally.
    done: dict = {}
    t = threading.Thread(
        target=lambda: done.update(out=engine.generate(input_ids=[3, 4], sampling_params={**GREEDY, "max_new_tokens": 8}))
    )
    t.start()
    with pytest.raises(ValueError, match=needle):
        engine.generate(**kwargs)
    t.join(timeout=60)
    assert done["out"]["meta_info"]["completion_tokens"] == 8


def test_abort_mid_stream_frees_pages(engine: Engine) -> None:
    stream = engine.generate(input_ids=_prompt(30), sampling_params={**GREEDY, "max_new_tokens": 500}, stream=True)
    chunks = []
    for chunk in stream:  # type: ignore[union-attr]
        chunks.append(chunk)
        if len(chunks) == 3:
            break
    stream.close()  # type: ignore[union-attr]
    assert chunks[-1]["meta_info"]["finish_reason"] is None
    assert 1 <= len(chunks[-1]["output_ids"]) < 500


def test_abort_by_id(engine: Engine) -> None:
    async def go() -> dict:
        agen = await engine.async_generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 800}, stream=True)
        last = None
        async for chunk in agen:  # type: ignore[union-attr]
            last = chunk
            if len(chunk["output_ids"]) == 2:
                engine.abort(chunk["meta_info"]["id"])
        assert last is not None
        return last

    last = asyncio.run(go())
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(last["output_ids"]) < 800


def test_stream_snapshots_are_cumulative(engine: Engine) -> None:
    final = engine.generate(input_ids=[9, 8, 7], sampling_params={**GREEDY, "max_new_tokens": 10})
    chunks = list(engine.generate(input_ids=[9, 8, 7], sampling_params={**GREEDY, "max_new_tokens": 10}, stream=True))  # type: ignore[arg-type]
    assert isinstance(final, dict)
    assert [len(c["output_ids"]) for c in chunks] == list(range(1, 11))
    assert chunks[-1]["output_ids"] == final["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length"}


def test_n_and_seed_reproducible(engine: Engine) -> None:
    params = {"temperature": 1.0, "max_new_tokens": 12, "n": 3, "seed": 1234, "ignore_eos": True}
    a = engine.generate(input_ids=[1, 2, 3], sampling_params=params)
    b = engine.generate(input_ids=[1, 2, 3], sampling_params=params)
    assert isinstance(a, list) and isinstance(b, list) and len(a) == 3
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    # The n samples draw from different streams, and another seed gives another sample.
    assert len({tuple(o["output_ids"]) for o in a}) == 3
    c = engine.generate(input_ids=[1, 2, 3], sampling_params={**params, "seed": 99, "n": 1})
    assert isinstance(c, dict) and c["output_ids"] != a[0]["output_ids"]


def test_seeded_request_independent_of_batch_neighbours(engine: Engine) -> None:
    params = {"temperature": 0.8, "max_new_tokens": 10, "seed": 7, "ignore_eos": True}
    alone = engine.generate(input_ids=[4, 4, 4], sampling_params=params)
    batch = engine.generate(
        input_ids=[[1, 1], [4, 4, 4], _prompt(37)],
        sampling_params=[{"temperature": 1.0, "max_new_tokens": 30}, params, {**GREEDY, "max_new_tokens": 5}],
    )
    assert isinstance(alone, dict) and isinstance(batch, list)
    assert batch[1]["output_ids"] == alone["output_ids"]


def test_continuous_batching_joins_between_steps(engine: Engine) -> None:
    """A request arriving while another decodes joins the running batch, finishes first, and both
    give the tokens they give alone."""
    long_p, short_p = _prompt(30, seed=5), _prompt(9, seed=6)
    long_solo = engine.generate(input_ids=long_p, sampling_params={**GREEDY, "max_new_tokens": 300})
    short_solo = engine.generate(input_ids=short_p, sampling_params={**GREEDY, "max_new_tokens": 5})

    async def go() -> tuple[dict, dict, int]:
        agen = await engine.async_generate(input_ids=long_p, sampling_params={**GREEDY, "max_new_tokens": 300}, stream=True)
        short_task = None
        long_len_when_short_done = -1
        last: dict = {}
        async for chunk in agen:  # type: ignore[union-attr]
            last = chunk
            if len(chunk["output_ids"]) == 3:
                short_task = asyncio.ensure_future(
                    engine.async_generate(input_ids=short_p, sampling_params={**GREEDY, "max_new_tokens": 5})
                )
            if short_task is not None and short_task.done() and long_len_when_short_done < 0:
                long_len_when_short_done = len(chunk["output_ids"])
        assert short_task is not None
        return last, await short_task, long_len_when_short_done

    long_out, short_out, at = asyncio.run(go())
    assert isinstance(long_solo, dict) and isinstance(short_solo, dict)
    assert long_out["output_ids"] == long_solo["output_ids"]
    assert short_out["output_ids"] == short_solo["output_ids"]
    assert 3 < at < 300  # the short request finished while the long one was still decoding


def test_stop_token_ids_and_min_new_tokens(engine: Engine) -> None:
    free = engine.generate(input_ids=[11, 12, 13], sampling_params={**GREEDY, "max_new_tokens": 16})
    assert isinstance(free, dict)
    ids = free["output_ids"]
    k = 4
    stop_tok = ids[k]
    first = ids.index(stop_tok)
    out = engine.generate(
        input_ids=[11, 12, 13], sampling_params={**GREEDY, "max_new_tokens": 16, "stop_token_ids": [stop_tok]}
    )
    assert isinstance(out, dict)
    assert out["output_ids"] == ids[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    # min_new_tokens masks stop tokens until it is reached: the greedy path changes at `first`.
    out2 = engine.generate(
        input_ids=[11, 12, 13],
        sampling_params={**GREEDY, "max_new_tokens": 16, "stop_token_ids": [stop_tok], "min_new_tokens": first + 2},
    )
    assert isinstance(out2, dict)
    assert len(out2["output_ids"]) >= first + 2
    assert stop_tok not in out2["output_ids"][: first + 2]


def test_context_length_caps_generation(engine: Engine) -> None:
    ctx = engine.runner.context_length
    out = engine.generate(input_ids=[1] * (ctx - 3), sampling_params={**GREEDY, "max_new_tokens": 50})
    assert isinstance(out, dict)
    assert len(out["output_ids"]) == 3
    assert out["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize("freeze", [True, False])
def test_gc_freeze_once_per_process(model_dir: Path, freeze: bool) -> None:
    """``gc_freeze`` moves the start-up objects to the collector's permanent generation after the
    first engine of a process starts (later engines do not freeze again); off, nothing is frozen
    until an engine asks. Runs in a fresh interpreter: freezing is process-wide."""
    import subprocess
    import sys

    code = (
        "import gc\n"
        "from sglang.engine.engine import Engine\n"
        f"e = Engine(model_path={str(model_dir)!r}, skip_tokenizer_init=True, device='cpu', gc_freeze={freeze})\n"
        "n1 = gc.get_freeze_count()\n"
        "out = e.generate(input_ids=[1, 2, 3], sampling_params={'max_new_tokens': 2, 'ignore_eos': True})\n"
        "e.shutdown()\n"
        "e2 = Engine(model_path=e.model_path, skip_tokenizer_init=True, device='cpu', gc_freeze=True)\n"
        "print(n1, gc.get_freeze_count(), len(out['output_ids']))\n"
        "e2.shutdown()\n"
    )
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": f"{root / 'libs'}:{root}"})
    assert res.returncode == 0, res.stderr[-3000:]
    n1, n2, tokens = map(int, res.stdout.split()[-3:])
    assert tokens == 2
    if freeze:
        assert n1 > 10_000 and n2 <= n1  # the second engine did not freeze again (frozen objects can still be freed)
    else:
        assert n1 == 0 and n2 > 10_000  # the second engine, which asks, freezes
