"""Attention backend registry with lazy imports (a backend's module loads only when chosen)."""

from __future__ import annotations

import importlib
from typing import Any

from sglang.engine.attention.base import AttentionBackend

_BACKENDS: dict[str, str] = {
    "torch_native": "sglang.engine.attention.torch_native:TorchNativeBackend",
}


def register_backend(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:Class"``."""
    _BACKENDS[name] = target


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def create_backend(name: str, **kwargs: Any) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; choose one of {available_backends()}")
    module, cls = _BACKENDS[name].split(":")
    backend_cls = getattr(importlib.import_module(module), cls)
    backend: AttentionBackend = backend_cls(**kwargs)
    return backend
