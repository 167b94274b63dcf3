"""Mistral: Llama with a sliding attention window on every layer (``config.sliding_window``)."""

from __future__ import annotations

from typing import Any

from sglang.engine.models.config import layer_sliding_windows
from sglang.engine.models.llama import AttentionOptions, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config: Any, layer_id: int) -> AttentionOptions:
        return AttentionOptions(sliding_window=layer_sliding_windows(config)[layer_id])
