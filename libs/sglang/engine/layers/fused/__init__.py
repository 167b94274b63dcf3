"""Fused Triton kernels for the elementwise layers (RMSNorm, rotary, SiluAndMul), CUDA only.

The layers ask :func:`use_fused` on every call; it is ``False`` for non-CUDA tensors, so CPU runs
keep the plain torch code (and its exact numerics). The first CUDA call decides, once per process,
whether Triton imports and whether ``SGLANG_DISABLE_FUSED_OPS`` is set (read then, never at import
time); :func:`set_fused_ops` overrides that decision (tests, benchmarks). The kernels themselves live
in :mod:`sglang.engine.layers.fused.triton_ops`, which imports Triton and is only imported here.
"""

from __future__ import annotations

import os

import torch

MAX_NORM_HIDDEN = 32768  # the fused RMSNorm holds a whole row in one program's registers
_enabled: bool | None = None  # None: not decided yet


def _probe() -> bool:
    return os.environ.get("SGLANG_DISABLE_FUSED_OPS", "0") in ("", "0") and _triton_imports()


def use_fused(x: torch.Tensor) -> bool:
    """Whether a layer should run its fused kernel on ``x`` (CUDA tensor, Triton available, not disabled)."""
    global _enabled
    if not x.is_cuda:
        return False
    if _enabled is None:
        _enabled = _probe()
    return _enabled


def set_fused_ops(enabled: bool | None) -> None:
    """Force the fused kernels on or off for CUDA tensors; ``None`` re-probes on the next call."""
    global _enabled
    _enabled = None if enabled is None else bool(enabled) and _triton_imports()


def _triton_imports() -> bool:
    try:
        import sglang.engine.layers.fused.triton_ops  # noqa: F401
    except ImportError:
        return False
    return True
