"""Rotary position embedding (RoPE), NeoX/HF layout (the two halves of each head rotate together).

Inverse frequencies are computed with the same float32 arithmetic as HF's rope init functions
(``default``, ``linear``, ``llama3``) so q/k match HF's rotated values. cos/sin are precomputed
for positions ``0 .. max_position - 1`` into one float32 cache ``[max_position, rotary_dim]``
(cos half, then sin half) indexed by absolute positions at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sglang.engine.attention.base import Rope
from sglang.engine.layers.fused import use_fused

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Everything that determines a model's rotary frequencies."""

    head_dim: int
    rotary_dim: int
    max_position: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int | None = None

    @classmethod
    def from_hf(cls, config: Any, head_dim: int | None = None) -> RopeConfig:
        """Read RoPE settings from an HF config: ``rope_parameters`` (transformers 5) or the legacy
        ``rope_theta`` + ``rope_scaling`` attributes. Unsupported rope types raise NotImplementedError."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None)
        if not params and isinstance(legacy, dict):
            params = dict(legacy)
        if params and all(isinstance(v, dict) for v in params.values()):
            raise NotImplementedError(f"per-layer rope_parameters are not supported: {sorted(params)}")
        rope_type = str(params.get("rope_type", params.get("type", "default")))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise NotImplementedError(f"rope_type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        if head_dim is None:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
        max_pos = int(config.max_position_embeddings)
        orig = params.get("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
        return cls(
            head_dim=int(head_dim),
            rotary_dim=int(head_dim * partial),
            max_position=max_pos,
            theta=float(theta) if theta is not None else 10000.0,
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(orig) if orig is not None else max_pos,
        )


def compute_inv_freq(rope: RopeConfig) -> torch.Tensor:
    """float32 CPU tensor ``[rotary_dim // 2]`` of inverse frequencies (scaled per ``rope_type``)."""
    dim = rope.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths slow down by ``factor``, short ones stay, the band between
    ``orig/high_freq_factor`` and ``orig/low_freq_factor`` interpolates smoothly."""
    orig = rope.original_max_position if rope.original_max_position is not None else rope.max_position
    lo, hi, factor = rope.low_freq_factor, rope.high_freq_factor, rope.factor
    long_wavelen = orig / lo
    short_wavelen = orig / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > long_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """``forward(positions [T], q [T, H*D], k [T, KVH*D]) -> (q, k)`` rotated, in their dtype.

    The cache is built on the default device at construction time (build the model under
    ``with torch.device(...)``); positions must be ``< max_position``. Not meta-device safe: the
    cache is a non-persistent buffer and is not in checkpoints. On CUDA q and k rotate in one fused
    Triton launch (:mod:`sglang.engine.layers.fused`) with the same rounding; elsewhere in torch.
    Either way q and k are not modified and the results are new contiguous tensors.
    """

    def __init__(self, rope: RopeConfig, attention_scaling: float = 1.0) -> None:
        super().__init__()
        if rope.rotary_dim % 2 or rope.rotary_dim > rope.head_dim:
            raise ValueError(f"bad rotary_dim {rope.rotary_dim} for head_dim {rope.head_dim}")
        self.rope = rope
        self.head_dim = rope.head_dim
        self.rotary_dim = rope.rotary_dim
        self.max_position = rope.max_position
        inv_freq = compute_inv_freq(rope)
        pos = torch.arange(rope.max_position, dtype=torch.int64, device="cpu").to(torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        cache = torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1)
        self.inv_freq: torch.Tensor
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()), persistent=False)

    @classmethod
    def from_hf(cls, config: Any, head_dim: int | None = None) -> RotaryEmbedding:
        return cls(RopeConfig.from_hf(config, head_dim=head_dim))

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fusable(q, k):
            from sglang.engine.layers.fused import triton_ops

            return triton_ops.apply_rotary(positions, q, k, self.cos_sin_cache, self.head_dim, self.rotary_dim)
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def rope_for(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> Rope:
        """This rotary as an attention backend's ``Rope`` (applied by the backend; fused with its
        K/V store where it can be)."""
        return Rope(positions, self.cos_sin_cache, self.rotary_dim, self, self._fusable(q, k))

    @staticmethod
    def _fusable(q: torch.Tensor, k: torch.Tensor) -> bool:
        """The Triton rotary kernel takes q and k (CUDA, fused ops on, one dtype)."""
        return use_fused(q) and q.dtype == k.dtype

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        x = x.view(t, -1, self.head_dim)
        cos = cos.unsqueeze(1).to(x.dtype)
        sin = sin.unsqueeze(1).to(x.dtype)
        x1, x2 = x[..., : self.rotary_dim].chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if self.rotary_dim < self.head_dim:
            out = torch.cat((out, x[..., self.rotary_dim :]), dim=-1)
        return out.reshape(t, -1)

    def extra_repr(self) -> str:
        r = self.rope
        return f"type={r.rope_type}, theta={r.theta}, rotary_dim={r.rotary_dim}, max_position={r.max_position}"
