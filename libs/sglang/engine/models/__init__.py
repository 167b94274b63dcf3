"""Model definitions (llama, mistral, qwen2, qwen3), the architecture registry and the loader.

Model classes are imported lazily through the registry; this package exposes only the entry points.
"""

from __future__ import annotations

from sglang.engine.models.config import ModelInfo
from sglang.engine.models.loader import load_model, resolve_device, resolve_dtype
from sglang.engine.models.registry import get_model_class, register_model, supported_architectures

__all__ = [
    "ModelInfo",
    "get_model_class",
    "load_model",
    "register_model",
    "resolve_device",
    "resolve_dtype",
    "supported_architectures",
]
