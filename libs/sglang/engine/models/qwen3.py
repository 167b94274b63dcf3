"""Qwen3 (dense): Llama with per-head RMSNorm of q and k before RoPE, an explicit ``head_dim``
(may differ from hidden/heads), ``attention_bias`` on q/k/v/o, optional per-layer sliding window."""

from __future__ import annotations

from typing import Any

from sglang.engine.models.config import layer_sliding_windows
from sglang.engine.models.llama import AttentionOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config: Any, layer_id: int) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(
            qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=layer_sliding_windows(config)[layer_id]
        )
