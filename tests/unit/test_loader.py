"""Model loader: safetensors single vs sharded, fused-weight placement, tied heads, seeded dummy
weights, clear errors for missing/unknown weights and unknown architectures, dtype/device rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from sglang.engine.models.config import ModelInfo
from sglang.engine.models.loader import load_model, resolve_device, resolve_dtype

from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=5)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"), seed=5)


def _params(model: Any) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _copy_config_only(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_single_and_sharded_checkpoints_load_identically(llama_dir: Path, tmp_path: Path) -> None:
    sharded = make_tiny_model("llama", tmp_path / "sharded", seed=5, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single, _, _ = load_model(str(llama_dir), "safetensors", "float32", "cpu", 0)
    multi, _, _ = load_model(str(sharded), "auto", "float32", "cpu", 0)
    a, b = _params(single), _params(multi)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fused_weights_hold_the_hf_tensors(llama_dir: Path) -> None:
    model, _, _ = load_model(str(llama_dir), "auto", "float32", "cpu", 0)
    hf = load_file(str(llama_dir / "model.safetensors"))
    p = _params(model)
    pre = "model.layers.1."
    qkv = torch.cat([hf[f"{pre}self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(p[f"{pre}self_attn.qkv_proj.weight"], qkv)
    gate_up = torch.cat([hf[f"{pre}mlp.{n}_proj.weight"] for n in ("gate", "up")])
    assert torch.equal(p[f"{pre}mlp.gate_up_proj.weight"], gate_up)
    assert torch.equal(p["lm_head.weight"], hf["lm_head.weight"])
    assert torch.equal(p["model.norm.weight"], hf["model.norm.weight"])
    assert not model.training
    assert not any(t.requires_grad for t in model.parameters())


def test_tied_embeddings_need_no_lm_head(qwen2_dir: Path) -> None:
    assert "lm_head.weight" not in load_file(str(qwen2_dir / "model.safetensors"))
    model: Any
    model, _, info = load_model(str(qwen2_dir), "auto", "float32", "cpu", 0)
    assert info.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "model.layers.0.self_attn.qkv_proj.bias" in _params(model)


def test_dummy_weights_are_seeded(qwen2_dir: Path, tmp_path: Path) -> None:
    cfg_only = _copy_config_only(qwen2_dir, tmp_path / "cfg")  # no weights needed for dummy
    a, _, _ = load_model(str(cfg_only), "dummy", "float32", "cpu", 0)
    b, _, _ = load_model(str(cfg_only), "dummy", "float32", "cpu", 0)
    c, _, _ = load_model(str(cfg_only), "dummy", "float32", "cpu", 1)
    pa, pb, pc = _params(a), _params(b), _params(c)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    w = "model.layers.0.mlp.gate_up_proj.weight"
    assert not torch.equal(pa[w], pc[w])
    assert abs(pa[w].std().item() - 0.02) < 0.002
    assert torch.equal(pa["model.layers.0.input_layernorm.weight"], torch.ones(64))
    assert torch.equal(pa["model.norm.weight"], torch.ones(64))
    assert torch.equal(pa["model.layers.0.self_attn.qkv_proj.bias"], torch.zeros(64 + 2 * 32))


def test_no_weights_is_a_clear_error(llama_dir: Path, tmp_path: Path) -> None:
    cfg_only = _copy_config_only(llama_dir, tmp_path / "cfg")
    for fmt in ("auto", "safetensors"):
        with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
            load_model(str(cfg_only), fmt, "float32", "cpu", 0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "nowhere"), "auto", "float32", "cpu", 0)
    with pytest.raises(ValueError, match="load_format"):
        load_model(str(llama_dir), "gguf", "float32", "cpu", 0)


def _edit_checkpoint(src: Path, dst: Path, edit: Any) -> Path:
    dst = _copy_config_only(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    bad = _edit_checkpoint(llama_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight\[k\]"):
        load_model(str(bad), "auto", "float32", "cpu", 0)
    bad = _edit_checkpoint(llama_dir, tmp_path / "n", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"lacks weights.*lm_head\.weight"):
        load_model(str(bad), "auto", "float32", "cpu", 0)


def test_unknown_or_misshapen_tensor_raises(llama_dir: Path, tmp_path: Path) -> None:
    bad = _edit_checkpoint(llama_dir, tmp_path / "u", lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"'model\.extra\.weight' has no place"):
        load_model(str(bad), "auto", "float32", "cpu", 0)
    bad = _edit_checkpoint(
        llama_dir, tmp_path / "s", lambda t: t.update({"model.norm.weight": torch.ones(65)})
    )
    with pytest.raises(ValueError, match=r"shape mismatch for model\.norm\.weight"):
        load_model(str(bad), "auto", "float32", "cpu", 0)


def test_rotary_inv_freq_in_checkpoint_is_ignored(llama_dir: Path, tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    ok = _edit_checkpoint(llama_dir, tmp_path / "r", lambda t: t.update({name: torch.zeros(8)}))
    model, _, _ = load_model(str(ok), "auto", "float32", "cpu", 0)
    assert model.model.rotary_emb.inv_freq[0] == 1.0


def test_unknown_architecture_is_named(llama_dir: Path, tmp_path: Path) -> None:
    d = _copy_config_only(llama_dir, tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported model architecture.*FooForCausalLM"):
        load_model(str(d), "dummy", "float32", "cpu", 0)


def test_dtype_and_device_rules() -> None:
    bf16_cfg = SimpleNamespace(dtype="bfloat16")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", bf16_cfg, cpu) == torch.float32
    assert resolve_dtype("auto", bf16_cfg, cuda) == torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace(dtype=torch.float16), cuda) == torch.float16
    assert resolve_dtype("auto", SimpleNamespace(dtype=None), cuda) == torch.float32
    assert resolve_dtype("bfloat16", bf16_cfg, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", bf16_cfg, cpu)
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto") == (cuda if torch.cuda.is_available() else cpu)


def test_model_info(llama_dir: Path, tmp_path: Path) -> None:
    d = make_tiny_model("qwen3", tmp_path / "q3", seed=0)
    cfg = json.loads((d / "config.json").read_text())
    gen = {"eos_token_id": [7, 2, 9]}
    (d / "generation_config.json").write_text(json.dumps(gen))
    _, _, info = load_model(str(d), "dummy", "auto", "cpu", 0)
    assert info == ModelInfo(
        architecture="Qwen3ForCausalLM", model_type="qwen3", num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, hidden_size=64, vocab_size=256, context_length=1024, dtype=torch.float32,
        eos_token_ids=[cfg["eos_token_id"], 7, 9], tie_word_embeddings=False, sliding_windows=[None, 40],
    )
