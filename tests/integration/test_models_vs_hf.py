"""Our models, loaded with ``load_model`` and run through the paged KV cache and the torch_native
backend, give the same logits as HF transformers on the same prompts.

Every family (Llama with GQA, Llama-3 rope scaling, Mistral with a sliding window, Qwen2 with qkv
bias and tied embeddings, Qwen3 with q/k norm, explicit head_dim and one sliding layer), several
requests packed in one batch, page sizes 1 and 16, one-shot prefill and prefix + extend + decode.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from sglang.engine.models.loader import load_model

from tests.helpers.forward import run_prefill
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
PROMPT_LENS = [1, 7, 64, 300]
PREFIX_SPLIT = [0, 3, 17, 160]  # 17 is not page aligned for page_size 16
VOCAB = 256
ATOL = 1e-4


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in PROMPT_LENS]


def _hf_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [hf(torch.tensor([p])).logits[0].float() for p in prompts]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    family = request.param
    path = make_tiny_model(family, tmp_path_factory.mktemp(family), vocab_size=VOCAB, seed=3)
    prompts = _prompts(11)
    model, config, info = load_model(str(path), "safetensors", "float32", "cpu", 0)
    return {
        "family": family, "path": path, "prompts": prompts, "model": model, "info": info,
        "expected": _hf_logits(path, prompts),
    }


def _assert_match(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == torch.float32
        assert g.shape == e.shape, (i, g.shape, e.shape)
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0, msg=lambda m, i=i: f"request {i}: {m}")
        assert torch.equal(g.argmax(-1), e.argmax(-1)), f"request {i}: greedy tokens differ"


@pytest.mark.parametrize("page_size", [1, 16])
def test_prefill_logits_match_hf(case: dict[str, Any], page_size: int) -> None:
    got = run_prefill(case["model"], case["info"], case["prompts"], page_size)
    _assert_match(got, case["expected"])


@pytest.mark.parametrize("page_size", [1, 16])
def test_prefix_extend_decode_logits_match_hf(case: dict[str, Any], page_size: int) -> None:
    got = run_prefill(case["model"], case["info"], case["prompts"], page_size, prefix_split=PREFIX_SPLIT)
    _assert_match(got, case["expected"])


EXPECTED_WINDOWS = {
    "llama": [None, None], "llama3": [None, None], "mistral": [48, 48], "qwen2": [None, None], "qwen3": [None, 40],
}


def test_sliding_window_is_applied(case: dict[str, Any]) -> None:
    """Layers get the config's windows, and a window really changes the output: with it switched
    off, the 300-token prompt diverges from HF."""
    windows = case["info"].sliding_windows
    attn_layers = [layer.self_attn.attn for layer in case["model"].model.layers]
    assert [a.sliding_window for a in attn_layers] == windows == EXPECTED_WINDOWS[case["family"]]
    if all(w is None for w in windows):
        return
    try:
        for a in attn_layers:
            a.sliding_window = None
        got = run_prefill(case["model"], case["info"], case["prompts"], 16)
    finally:
        for a, w in zip(attn_layers, windows, strict=True):
            a.sliding_window = w
    diff = (got[3] - case["expected"][3]).abs().max().item()
    assert diff > 1e-2, diff


def test_bfloat16_load_runs(case: dict[str, Any]) -> None:
    model, _, info = load_model(str(case["path"]), "auto", "bfloat16", "cpu", 0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    got = run_prefill(model, info, case["prompts"], 16, prefix_split=PREFIX_SPLIT)
    for g, e in zip(got, case["expected"], strict=True):
        assert g.dtype == torch.float32 and g.shape == e.shape
        assert torch.isfinite(g).all()
