"""The engine on a CUDA GPU (torch_native backend): token-identical to HF on the same GPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from sglang.engine.engine import Engine

from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

VOCAB = 256


def _hf_greedy(path: Path, prompts: list[list[int]], n: int, dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    hf.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
            outs.append(g[0, len(p) :].tolist())
    return outs


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_gpu_greedy_matches_hf(tmp_path: Path, family: str, page_size: int) -> None:
    path = make_tiny_model(family, tmp_path, vocab_size=VOCAB, seed=1)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 17, 200, 512)]
    expected = _hf_greedy(path, prompts, 10, torch.float32)
    eng = Engine(model_path=str(path), skip_tokenizer_init=True, device="cuda", dtype="float32",
                 page_size=page_size, chunked_prefill_size=64, max_total_tokens=8192)
    try:
        outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 10, "ignore_eos": True})
        assert [o["output_ids"] for o in outs] == expected  # type: ignore[index]
        eng.check_integrity()
        assert eng.get_stats()["num_used_pages"] == 0
    finally:
        eng.shutdown()


def test_gpu_bfloat16_runs(tmp_path: Path) -> None:
    path = make_tiny_model("llama", tmp_path, vocab_size=VOCAB, seed=2)
    eng = Engine(model_path=str(path), skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_total_tokens=4096)
    try:
        assert eng.runner.dtype == torch.bfloat16
        out = eng.generate(input_ids=[[1, 2, 3], [4] * 100], sampling_params={"temperature": 0, "max_new_tokens": 16, "ignore_eos": True})
        assert [len(o["output_ids"]) for o in out] == [16, 16]  # type: ignore[index]
    finally:
        eng.shutdown()
