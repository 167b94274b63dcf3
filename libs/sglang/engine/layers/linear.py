"""Linear layers: a plain linear and a column-merged linear (fused qkv, fused gate/up).

Parameters are allocated with ``torch.empty`` and never initialised here: the loader either copies
checkpoint tensors in or draws dummy weights. Build models under ``with torch.device(...)`` to
allocate straight on the target device.

Merged layers store several HF projections stacked along the output dimension, so one GEMM
computes all of them. Checkpoints still carry the projections separately (``q_proj``, ``k_proj``,
``v_proj``; ``gate_proj``, ``up_proj``); :meth:`MergedColumnLinear.load_shard` places each one at
its row range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang.engine.layers.fused import try_skinny_linear


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copy ``loaded`` into ``param`` (any dtype/device), raising ValueError on a shape mismatch."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch for {name}: model has {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


class Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` ``[out_features, in_features]`` (HF layout, loads as is)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = try_skinny_linear(x, self.weight, self.bias)  # decode batches on CUDA (None elsewhere)
        return y if y is not None else F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MergedColumnLinear(Linear):
    """Several linears over the same input, stacked along the output dimension.

    ``output_sizes`` is ordered: shard ``names[i]`` owns output rows
    ``offset(i) .. offset(i) + output_sizes[i]``. The forward returns the stacked output; callers
    split it with :meth:`split` (or ``torch.split(y, self.output_sizes, -1)``).
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: dict[str, int],
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, sum(output_sizes.values()), bias=bias, dtype=dtype)
        self.shard_names = list(output_sizes)
        self.output_sizes = list(output_sizes.values())
        self._offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in output_sizes.items():
            self._offsets[name] = (off, size)
            off += size

    def shard_rows(self, shard: str) -> tuple[int, int]:
        """``(start, size)`` of ``shard``'s output rows. KeyError for an unknown shard."""
        return self._offsets[shard]

    def load_shard(self, shard: str, kind: str, loaded: torch.Tensor) -> None:
        """Copy an HF projection's ``weight`` or ``bias`` (``kind``) into its row range."""
        param = self.weight if kind == "weight" else self.bias
        if param is None or kind not in ("weight", "bias"):
            raise ValueError(f"{type(self).__name__} has no {kind!r} parameter for shard {shard!r}")
        if shard not in self._offsets:
            raise ValueError(f"unknown shard {shard!r}; this layer has {self.shard_names}")
        start, size = self._offsets[shard]
        copy_checked(param.data.narrow(0, start, size), loaded, f"{shard}.{kind}")

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.split(y, self.output_sizes, dim=-1))


class QKVLinear(MergedColumnLinear):
    """Fused q/k/v projection with shards ``q``, ``k``, ``v`` (GQA: k and v have fewer heads)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        kv = num_kv_heads * head_dim
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": kv, "v": kv}, bias=bias, dtype=dtype)
        self.q_size = num_heads * head_dim
        self.kv_size = kv
