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
# The skinny matmul replaces cuBLAS for decode batches of at most SKINNY_MAX_ROWS rows and weights
# of at least SKINNY_MIN_WEIGHT elements (SKINNY_MIN_WEIGHT_M1 for one row): there it reads weights
# faster (benchmarks/gemv.py, H100: at one row 1.3-2.2x cuBLAS even on Qwen3-0.6B's 2-6M-element
# matrices); on smaller weights cuBLAS is as fast or faster.
SKINNY_MAX_ROWS = 16
SKINNY_MIN_WEIGHT = 16 * 2**20
SKINNY_MIN_WEIGHT_M1 = 2**20
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


def try_skinny_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
    gated: bool = False,
) -> torch.Tensor | None:
    """``F.linear(x, w, bias)`` (as ``out_dtype``) by the Triton skinny matmul when it pays for
    this shape, else ``None`` (the caller runs ``F.linear``). ``gated``: ``w`` is ``[gate; up]``
    and the result is ``silu(gate) * up`` (``SiluAndMul`` fused into the same kernel)."""
    if x.dim() != 2 or x.shape[0] > SKINNY_MAX_ROWS or not use_fused(x):
        return None
    if w.numel() < (SKINNY_MIN_WEIGHT_M1 if x.shape[0] == 1 else SKINNY_MIN_WEIGHT):
        return None
    from sglang.engine.layers.fused import gemv

    cfg = gemv.default_config(x.shape[0], w.shape[0], x.shape[1], gated)
    if not gemv.supported(x, w, cfg) or (bias is not None and bias.dtype != x.dtype) or (gated and w.shape[0] % 2):
        return None
    return gemv.skinny_linear(x, w, bias, cfg=cfg, out_dtype=out_dtype, gated=gated)


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
