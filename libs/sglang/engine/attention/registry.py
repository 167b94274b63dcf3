"""Attention backend registry with lazy imports (a backend's module loads only when chosen)."""

from __future__ import annotations

from typing import Any

from sglang.engine.attention.base import AttentionBackend
from sglang.utils.registry import LazyRegistry

BACKENDS: LazyRegistry[AttentionBackend] = LazyRegistry(
    "attention_backend", {"torch_native": "sglang.engine.attention.torch_native:TorchNativeBackend"}
)


def register_backend(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:Class"``."""
    BACKENDS.register(name, target)


def available_backends() -> list[str]:
    return BACKENDS.names()


def create_backend(name: str, **kwargs: Any) -> AttentionBackend:
    return BACKENDS.create(name, **kwargs)
