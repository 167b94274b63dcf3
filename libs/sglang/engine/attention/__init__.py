"""Attention backends behind one interface (registry with lazy imports)."""

from __future__ import annotations

from sglang.engine.attention.base import AttentionBackend, AttentionLayerSpec
from sglang.engine.attention.registry import (
    available_backends,
    create_backend,
    register_backend,
    resolve_backend_name,
)

__all__ = [
    "AttentionBackend",
    "AttentionLayerSpec",
    "available_backends",
    "create_backend",
    "register_backend",
    "resolve_backend_name",
]
