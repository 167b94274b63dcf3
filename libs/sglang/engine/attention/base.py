"""Attention backend interface.

A backend receives the new tokens' q/k/v for one layer, stores k/v into the paged KV pool at
``batch.out_cache_loc`` and returns attention output over each request's whole context
(prefix in KV + the new tokens, causal). Backends may precompute per-batch metadata once in
``init_forward_metadata``; that is called by the runner before the model forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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
