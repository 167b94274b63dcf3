"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang.engine.layers.fused import use_fused


class SiluAndMul(nn.Module):
    """``x = [gate | up]`` (last dim ``2n``) -> ``silu(gate) * up`` (last dim ``n``).

    On CUDA one fused Triton kernel (:mod:`sglang.engine.layers.fused`), elsewhere torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            from sglang.engine.layers.fused import triton_ops

            return triton_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
