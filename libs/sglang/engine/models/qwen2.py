"""Qwen2 / Qwen2.5: Llama with biased q/k/v (not o), often tied embeddings, optional sliding
window on the layers that ``layer_types`` marks ``sliding_attention``."""

from __future__ import annotations

from typing import Any

from sglang.engine.models.config import layer_sliding_windows
from sglang.engine.models.llama import AttentionOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config: Any, layer_id: int) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True, o_bias=False, sliding_window=layer_sliding_windows(config)[layer_id])
