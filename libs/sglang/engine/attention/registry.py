"""Attention backend registry with lazy imports (a backend's module loads only when chosen)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from sglang.engine.attention.base import AttentionBackend
from sglang.utils.registry import LazyRegistry

BACKENDS: LazyRegistry[AttentionBackend] = LazyRegistry(
    "attention_backend",
    {
        "torch_native": "sglang.engine.attention.torch_native:TorchNativeBackend",
        "triton": "sglang.engine.attention.triton.backend:TritonBackend",
    },
)


def register_backend(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:Class"``."""
    BACKENDS.register(name, target)


def available_backends() -> list[str]:
    return ["auto", *BACKENDS.names()]


def resolve_backend_name(name: str, device: torch.device) -> str:
    """The concrete backend for setting ``name`` on ``device``.

    ``"auto"`` is ``"triton"`` on CUDA when triton is installed, else ``"torch_native"`` (so CPU
    always gets the reference). Other names pass through; ``"triton"`` off CUDA is refused unless
    Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, for tests).
    """
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_installed() else "torch_native"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"attention_backend 'triton' needs a CUDA device, got {device}; use 'auto' or 'torch_native'")
    return name


def _triton_installed() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. built for another torch) counts as absent
        return False
    return True


def create_backend(name: str, **kwargs: Any) -> AttentionBackend:
    return BACKENDS.create(name, **kwargs)
