"""RMSNorm, numerically as HF's ``LlamaRMSNorm``: normalise in float32, cast back, then scale."""

from __future__ import annotations

import torch
from torch import nn

from sglang.engine.layers.fused import MAX_NORM_HIDDEN, use_fused


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim.

    :meth:`add_norm` fuses the residual add of a pre-norm decoder layer: it adds in the input
    dtype (as HF's decoder layers do) and returns ``(normed, sum)``; the caller keeps the sum as
    the new residual.

    On CUDA both run one fused Triton kernel (:mod:`sglang.engine.layers.fused`) with the same
    rounding order; elsewhere the torch code below.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.to(torch.float32)
        var = xf.pow(2).mean(-1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(var + self.eps)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x) and x.shape[-1] == self.hidden_size <= MAX_NORM_HIDDEN:
            from sglang.engine.layers.fused import triton_ops

            return triton_ops.rmsnorm(x, self.weight, self.eps)
        return self._norm(x)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            use_fused(x) and x.shape[-1] == self.hidden_size <= MAX_NORM_HIDDEN
            and x.dtype == residual.dtype and x.shape == residual.shape
        ):
            from sglang.engine.layers.fused import triton_ops

            return triton_ops.fused_add_rmsnorm(x, residual, self.weight, self.eps)
        summed = x + residual
        return self._norm(summed), summed

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
