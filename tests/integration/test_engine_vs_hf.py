"""Greedy output of sglang.Engine is token-identical to HF transformers ``generate``.

Every model family, one batch mixing prompt lengths 1..512, at page_size 1 and 16, with chunked
prefill forced small, and with retraction forced by a tiny KV cache. After each run the allocator's
integrity holds and every page is back.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from sglang.engine.engine import Engine

from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT_LENS = [512, 1, 64, 5, 130, 31]
NEW_TOKENS = 12
VOCAB = 256


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in PROMPT_LENS]


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.eval()
    hf.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            g = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )
            outs.append(g[0, len(p) :].tolist())
    return outs


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    family = request.param
    path = make_tiny_model(family, tmp_path_factory.mktemp(family), vocab_size=VOCAB, seed=1)
    prompts = _prompts(7)
    return family, path, prompts, hf_greedy(path, prompts, NEW_TOKENS)


def _run(path: Path, prompts: list[list[int]], **settings) -> tuple[list[list[int]], dict]:
    engine = Engine(model_path=str(path), skip_tokenizer_init=True, dtype="float32", device="cpu", **settings)
    try:
        outs = engine.generate(
            input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
        )
        engine.check_integrity()
        stats = engine.get_stats()
        assert stats["num_used_pages"] == 0, stats
        assert isinstance(outs, list)
        assert all(o["meta_info"]["finish_reason"] == {"type": "length"} for o in outs)
        return [o["output_ids"] for o in outs], stats
    finally:
        engine.shutdown()


@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_matches_hf(family_case, page_size: int) -> None:
    _, path, prompts, expected = family_case
    got, _ = _run(path, prompts, page_size=page_size)
    assert got == expected


def test_greedy_matches_hf_chunked_prefill(family_case) -> None:
    _, path, prompts, expected = family_case
    got, stats = _run(path, prompts, page_size=16, chunked_prefill_size=32)
    assert got == expected
    # 6 prompts, 743 prompt tokens in chunks of at most 32: many more extend steps than requests.
    assert stats["num_steps"] >= sum(PROMPT_LENS) // 32 + NEW_TOKENS


def test_greedy_matches_hf_with_retraction(family_case) -> None:
    _, path, prompts, expected = family_case
    # Room for the longest prompt and its outputs, not for everything at once: decode must retract.
    got, stats = _run(path, prompts, page_size=16, max_total_tokens=624, new_token_ratio=0.0)
    assert got == expected
    assert stats["num_retractions"] > 0
