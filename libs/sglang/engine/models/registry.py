"""Model registry: HF ``architectures`` name -> ``"module:Class"``, imported only when chosen."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "sglang.engine.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "sglang.engine.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "sglang.engine.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "sglang.engine.models.qwen3:Qwen3ForCausalLM",
}

# Configs without ``architectures`` (hand-written or converted ones) fall back on ``model_type``.
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def register_model(architecture: str, target: str) -> None:
    """Register ``architecture`` (as in config.json ``architectures``) -> ``"module:Class"``."""
    if ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    _MODELS[architecture] = target


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_architecture(config: Any) -> str:
    """The first of ``config.architectures`` that is registered (or the ``model_type`` fallback).

    Raises ValueError naming the config's architectures and listing the supported ones."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            return arch
    if not archs:
        model_type = getattr(config, "model_type", None)
        if model_type in _MODEL_TYPES:
            return _MODEL_TYPES[model_type]
        raise ValueError(
            f"config has no 'architectures' and model_type {model_type!r} is not supported; "
            f"supported architectures: {supported_architectures()}"
        )
    raise ValueError(f"unsupported model architecture(s) {archs}; supported: {supported_architectures()}")


def get_model_class(config: Any) -> type[nn.Module]:
    """Import and return the model class for an HF config (see :func:`resolve_architecture`)."""
    module_name, cls_name = _MODELS[resolve_architecture(config)].split(":")
    cls: type[nn.Module] = getattr(importlib.import_module(module_name), cls_name)
    return cls
