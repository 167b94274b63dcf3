"""Attention layer: per-layer attention geometry plus a call into the batch's attention backend.

The layer holds no weights and no KV state; the backend owns the KV write and the attention
math (see ``sglang.engine.attention.base``). It implements ``AttentionLayerSpec``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sglang.engine.attention.base import Rope
    from sglang.engine.runner.forward_batch import ForwardBatch


class Attention(nn.Module):
    """``forward(q [T, H*D], k [T, KVH*D], v [T, KVH*D], batch) -> [T, H*D]``.

    q/k carry their rotary embeddings, or ``rope`` says how to apply them. ``sliding_window`` (tokens, the query included) is
    None for full attention.
    """

    def __init__(
        self,
        layer_id: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5 if scaling is None else scaling
        self.sliding_window = sliding_window

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, rope: Rope | None = None
    ) -> torch.Tensor:
        """``rope``: q and k still need their rotary embedding (the backend applies it, possibly
        fused with its K/V store: ``AttentionBackend.forward_rope``)."""
        if rope is None:
            return batch.attn_backend.forward(q, k, v, self, batch)
        return batch.attn_backend.forward_rope(q, k, v, self, batch, rope)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_id}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, window={self.sliding_window}"
        )
