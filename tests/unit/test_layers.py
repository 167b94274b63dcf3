"""Layers against HF's reference implementations: rotary (default, linear, llama3 scaling, legacy
config format), RMSNorm, SiluAndMul, merged linears' shard placement, tied LM head, attention
layer dispatch, model registry."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sglang.engine.layers import (
    Attention,
    LMHead,
    MergedColumnLinear,
    QKVLinear,
    RMSNorm,
    RopeConfig,
    RotaryEmbedding,
    SiluAndMul,
    VocabEmbedding,
)
from sglang.engine.layers.rotary import compute_inv_freq
from sglang.engine.models.registry import get_model_class, resolve_architecture, supported_architectures
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

pytestmark = pytest.mark.unit

LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64, "rope_theta": 500000.0,
}
ROPES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": LLAMA3,
}


def _config(rope: dict[str, Any], head_dim: int = 32) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=1024, rope_parameters=dict(rope),
    )


def _hf_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)[0]
    return ROPE_INIT_FUNCTIONS[rope_type](cfg)[0]


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_inv_freq_bitwise_equal_to_hf(kind: str) -> None:
    cfg = _config(ROPES[kind])
    ours = compute_inv_freq(RopeConfig.from_hf(cfg))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, _hf_inv_freq(cfg))


def test_llama3_scaling_changes_low_frequencies_only() -> None:
    base = compute_inv_freq(RopeConfig.from_hf(_config({"rope_type": "default", "rope_theta": 500000.0})))
    scaled = compute_inv_freq(RopeConfig.from_hf(_config(LLAMA3)))
    assert scaled[0] == base[0]  # highest frequency (wavelength 2*pi < 64/4) untouched
    torch.testing.assert_close(scaled[-1], base[-1] / 8.0, rtol=1e-6, atol=0)  # longest wavelength / factor
    assert ((scaled < base) & (scaled > base / 8.0)).any()  # the smoothed band exists


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rotary_matches_hf_apply(kind: str) -> None:
    cfg = _config(ROPES[kind])
    d, h, kvh, t = 32, 4, 2, 50
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 1024, (t,), generator=gen)
    q = torch.randn(t, h * d, generator=gen)
    k = torch.randn(t, kvh * d, generator=gen)

    ours_q, ours_k = RotaryEmbedding.from_hf(cfg)(positions, q, k)

    hf_rope = LlamaRotaryEmbedding(cfg)
    cos, sin = hf_rope(q, positions[None])
    hq, hk = apply_rotary_pos_emb(
        q.view(1, t, h, d).transpose(1, 2), k.view(1, t, kvh, d).transpose(1, 2), cos, sin
    )
    torch.testing.assert_close(ours_q, hq.transpose(1, 2).reshape(t, h * d), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_k, hk.transpose(1, 2).reshape(t, kvh * d), atol=1e-6, rtol=0)
    # position 0 is the identity rotation
    z_q, _ = RotaryEmbedding.from_hf(cfg)(torch.zeros(1, dtype=torch.int64), q[:1], k[:1])
    assert torch.equal(z_q, q[:1])


def test_rotary_legacy_config_attributes() -> None:
    """Old-style configs: ``rope_theta`` attribute + ``rope_scaling`` dict with ``type``."""
    legacy = SimpleNamespace(
        hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=1024, rope_theta=500000.0,
        rope_scaling={k if k != "rope_type" else "type": v for k, v in LLAMA3.items() if k != "rope_theta"},
    )
    rope = RopeConfig.from_hf(legacy)
    assert (rope.rope_type, rope.theta, rope.original_max_position) == ("llama3", 500000.0, 64)
    assert torch.equal(compute_inv_freq(rope), _hf_inv_freq(_config(LLAMA3)))
    plain = SimpleNamespace(hidden_size=64, num_attention_heads=4, max_position_embeddings=16)
    rope = RopeConfig.from_hf(plain)
    assert (rope.rope_type, rope.theta, rope.head_dim, rope.rotary_dim) == ("default", 10000.0, 16, 16)


def test_partial_rotary_leaves_tail_untouched() -> None:
    rope = RotaryEmbedding(RopeConfig(head_dim=16, rotary_dim=8, max_position=32))
    q = torch.randn(5, 2 * 16)
    out, _ = rope(torch.arange(5), q, q[:, :16])
    assert torch.equal(out.view(5, 2, 16)[..., 8:], q.view(5, 2, 16)[..., 8:])
    assert not torch.equal(out.view(5, 2, 16)[1:, :, :8], q.view(5, 2, 16)[1:, :, :8])


def test_unsupported_rope_type_raises() -> None:
    with pytest.raises(NotImplementedError, match="'yarn'"):
        RopeConfig.from_hf(SimpleNamespace(
            hidden_size=64, num_attention_heads=4, max_position_embeddings=16,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
        ))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(7, 64, generator=gen)).to(dtype)
    res = torch.randn(7, 64, generator=gen).to(dtype)
    w = (1 + 0.3 * torch.randn(64, generator=gen)).to(dtype)
    hf = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    ours = RMSNorm(64, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
        ours.weight.copy_(w)
        assert torch.equal(ours(x), hf(x))
        normed, summed = ours.add_norm(x, res)
        assert torch.equal(summed, x + res)
        assert torch.equal(normed, hf(x + res))
    assert ours(x).dtype == dtype


def test_silu_and_mul() -> None:
    x = torch.randn(3, 10)
    assert torch.equal(SiluAndMul()(x), F.silu(x[:, :5]) * x[:, 5:])


def test_qkv_linear_places_shards() -> None:
    hidden, d, h, kvh = 8, 4, 4, 2
    layer = QKVLinear(hidden, d, h, kvh, bias=True)
    assert layer.output_sizes == [16, 8, 8]
    parts = {s: (torch.randn(n, hidden), torch.randn(n)) for s, n in zip("qkv", [16, 8, 8], strict=True)}
    for s in "kvq":  # order of arrival must not matter
        layer.load_shard(s, "weight", parts[s][0])
        layer.load_shard(s, "bias", parts[s][1])
    assert torch.equal(layer.weight, torch.cat([parts[s][0] for s in "qkv"]))
    assert torch.equal(layer.bias, torch.cat([parts[s][1] for s in "qkv"]))
    x = torch.randn(3, hidden)
    q, k, v = layer.split(layer(x))
    torch.testing.assert_close(k, F.linear(x, *parts["k"]))
    assert layer.shard_rows("v") == (24, 8)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.load_shard("k", "weight", torch.randn(16, hidden))
    with pytest.raises(ValueError, match="unknown shard"):
        layer.load_shard("x", "weight", torch.randn(8, hidden))
    with pytest.raises(ValueError, match="no 'bias'"):
        MergedColumnLinear(hidden, {"gate": 4, "up": 4}).load_shard("up", "bias", torch.randn(4))


def test_tied_lm_head_shares_embedding() -> None:
    emb = VocabEmbedding(10, 4)
    with torch.no_grad():
        emb.weight.normal_()
    head = LMHead(10, 4, tied_to=emb)
    assert head.weight is emb.weight
    h = torch.randn(2, 4, dtype=torch.float32)
    torch.testing.assert_close(head(h), h @ emb.weight.T)
    assert LMHead(10, 4, dtype=torch.bfloat16)(h.bfloat16()).dtype == torch.bfloat16  # model dtype; the sampler converts
    with pytest.raises(ValueError, match="cannot tie"):
        LMHead(11, 4, tied_to=emb)


def test_attention_layer_calls_batch_backend() -> None:
    calls: list[Any] = []

    class Recorder:
        def forward(self, q: Any, k: Any, v: Any, layer: Any, batch: Any) -> torch.Tensor:
            calls.append((q, k, v, layer, batch))
            return q * 2

    attn = Attention(layer_id=3, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=16)
    assert (attn.layer_id, attn.scaling, attn.sliding_window) == (3, 8**-0.5, 16)
    batch: Any = SimpleNamespace(attn_backend=Recorder())
    q, k, v = torch.ones(2, 32), torch.ones(2, 16), torch.ones(2, 16)
    assert torch.equal(attn(q, k, v, batch), q * 2)
    assert calls[0][3] is attn and calls[0][4] is batch
    with pytest.raises(ValueError, match="multiple"):
        Attention(0, num_heads=4, num_kv_heads=3, head_dim=8)


def test_registry() -> None:
    assert supported_architectures() == [
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    ]
    for arch in supported_architectures():
        assert get_model_class(SimpleNamespace(architectures=[arch])).__name__ == arch
    # first supported architecture wins; model_type is the fallback when there are none
    assert resolve_architecture(SimpleNamespace(architectures=["Nope", "Qwen2ForCausalLM"])) == "Qwen2ForCausalLM"
    assert resolve_architecture(SimpleNamespace(architectures=None, model_type="qwen3")) == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match=r"FooForCausalLM.*LlamaForCausalLM"):
        get_model_class(SimpleNamespace(architectures=["FooForCausalLM"]))
