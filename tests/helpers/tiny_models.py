"""Tiny random HF models built with the real transformers classes and saved as safetensors.

``make_tiny_model("llama" | "llama3" | "mistral" | "qwen2" | "qwen3", path)`` writes config.json +
safetensors into ``path`` and returns it. Weights are deterministic for a given seed. The init
std is large (``initializer_range`` 0.15) so logits are well separated and greedy decoding has
no near-ties; norm weights and biases are randomised too (HF inits them to ones/zeros), so a
loader that drops them is caught. Tokenizer files are not written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.15,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}


def _config(family: str, vocab_size: int, overrides: dict[str, Any]) -> Any:
    import transformers as tf

    kw: dict[str, Any] = {**_COMMON, "vocab_size": vocab_size}
    if family == "llama":
        cfg_cls, kw["tie_word_embeddings"] = tf.LlamaConfig, False
    elif family == "llama3":
        cfg_cls, kw["tie_word_embeddings"] = tf.LlamaConfig, False
        kw["rope_parameters"] = dict(LLAMA3_ROPE)
        kw["eos_token_id"] = [2, 3]
    elif family == "mistral":
        cfg_cls, kw["tie_word_embeddings"] = tf.MistralConfig, False
        kw["sliding_window"] = 48
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    elif family == "qwen2":
        cfg_cls, kw["tie_word_embeddings"] = tf.Qwen2Config, True
    elif family == "qwen3":
        cfg_cls, kw["tie_word_embeddings"] = tf.Qwen3Config, False
        kw["head_dim"] = 32  # != hidden_size / num_attention_heads (16)
        # Layer 1 uses a sliding window (layer_types), layer 0 full attention.
        kw.update(use_sliding_window=True, sliding_window=40, max_window_layers=1)
    else:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {FAMILIES}")
    kw.update(overrides)
    cfg = cfg_cls(**kw)
    cfg.dtype = torch.float32
    return cfg


def build_tiny_hf_model(family: str, vocab_size: int = 256, seed: int = 0, **overrides: Any) -> Any:
    """The HF model object itself (float32, eval mode, deterministic for ``seed``)."""
    import transformers as tf

    cfg = _config(family, vocab_size, overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_tiny_model(
    family: str,
    path: str | Path,
    vocab_size: int = 256,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny ``family`` model to ``path`` (config.json + safetensors; sharded with an index
    file when ``max_shard_size`` is given, e.g. ``"40KB"``). ``overrides`` go to the HF config."""
    path = Path(path)
    model = build_tiny_hf_model(family, vocab_size=vocab_size, seed=seed, **overrides)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kwargs)
    return path
