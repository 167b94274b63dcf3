"""Attention backend interface.

A backend receives the new tokens' q/k/v for one layer, stores k/v into the paged KV pool at
``batch.out_cache_loc`` and returns attention output over each request's whole context
(prefix in KV + the new tokens, causal). Backends may precompute per-batch metadata once in
``init_forward_metadata``; that is called by the runner before the model forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from sglang.engine.runner.forward_batch import ForwardBatch


class AttentionLayerSpec(Protocol):
    """What a backend needs to know about the calling layer."""

    layer_id: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    sliding_window: int | None


@dataclass(frozen=True)
class Rope:
    """Rotary embedding still to apply to q and k (``AttentionBackend.forward_rope``).

    ``apply(positions, q, k) -> (q, k)`` is the layer's own rotary (NeoX rotate-half);
    ``cos_sin_cache[pos]`` is ``cat(cos, sin)`` (``rotary_dim / 2`` each, attention scaling
    included); ``fused``: the layer would run its Triton kernel on these tensors (CUDA, Triton,
    fused ops not disabled), so a backend may fold the rotation into its own K/V store instead."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    rotary_dim: int
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    fused: bool


class AttentionBackend(ABC):
    """Contract: ``forward(q [T, H*D], k [T, KVH*D], v [T, KVH*D]) -> [T, H*D]`` in q's dtype.
    k/v are written to the pool (the backend owns that write); the pool is never resized."""

    name: str = "base"

    def init_forward_metadata(self, batch: ForwardBatch) -> None:  # noqa: B027 - optional hook
        """Precompute index tensors for ``batch`` (stored in ``batch.attn_metadata``)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayerSpec,
        batch: ForwardBatch,
    ) -> torch.Tensor: ...

    def forward_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayerSpec,
        batch: ForwardBatch,
        rope: Rope,
    ) -> torch.Tensor:
        """``forward`` on q and k before their rotary embedding: the same result as
        ``forward(*rope.apply(rope.positions, q, k), v, layer, batch)``, which is what this default
        does; a backend may fuse the rotation with its K/V store."""
        q, k = rope.apply(rope.positions, q, k)
        return self.forward(q, k, v, layer, batch)
