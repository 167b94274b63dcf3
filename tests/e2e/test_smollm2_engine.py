"""The default real model (SmolLM2-135M-Instruct) through sglang.Engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from sglang.engine.engine import Engine
from sglang.engine.models.default_model import default_model_path

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(page_size=16)  # the default model, float32 on CPU
    yield eng
    eng.shutdown()


def _chat(engine: Engine, text: str) -> str:
    assert engine.tokenizer is not None
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def test_answers_paris(engine: Engine) -> None:
    out = engine.generate(prompt=_chat(engine, QUESTION), sampling_params={"temperature": 0, "max_new_tokens": 40})
    assert isinstance(out, dict)
    assert "Paris" in out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}  # <|im_end|>
    engine.check_integrity()


def test_greedy_token_identical_to_hf(engine: Engine) -> None:
    from transformers import AutoModelForCausalLM

    prompts = [_chat(engine, QUESTION), "Once upon a time", _chat(engine, "Name three colors.")]
    outs = engine.generate(prompt=prompts, sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
    assert isinstance(outs, list)
    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    assert engine.tokenizer is not None
    for p, o in zip(prompts, outs, strict=True):
        ids = torch.tensor([engine.tokenizer.encode(p)])
        g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert o["output_ids"] == g[0, ids.shape[1] :].tolist()


def test_stream_text_and_stop_string(engine: Engine) -> None:
    prompt = _chat(engine, QUESTION)
    full = engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 40})
    chunks = list(engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 40}, stream=True))  # type: ignore[arg-type]
    assert isinstance(full, dict)
    assert chunks[-1]["text"] == full["text"]
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:], strict=False))
    # " Paris" spans a token boundary from "is": stop on "is Par" trims it and everything after.
    out = engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 40, "stop": "is Par"})
    assert isinstance(out, dict)
    assert out["text"] == full["text"][: full["text"].index("is Par")]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "is Par"}
    streamed = list(
        engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 40, "stop": "is Par"}, stream=True)  # type: ignore[arg-type]
    )
    assert all("is Pa" not in c["text"] for c in streamed)
    assert streamed[-1]["text"] == out["text"]
    engine.check_integrity()
