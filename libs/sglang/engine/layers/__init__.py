"""Model building blocks: linear, norms, rotary, activation, embedding, attention (calls a backend)."""

from __future__ import annotations

from sglang.engine.layers.activation import SiluAndMul
from sglang.engine.layers.attention import Attention
from sglang.engine.layers.embedding import LMHead, VocabEmbedding
from sglang.engine.layers.linear import Linear, MergedColumnLinear, QKVLinear
from sglang.engine.layers.norm import RMSNorm
from sglang.engine.layers.rotary import RopeConfig, RotaryEmbedding

__all__ = [
    "Attention",
    "LMHead",
    "Linear",
    "MergedColumnLinear",
    "QKVLinear",
    "RMSNorm",
    "RopeConfig",
    "RotaryEmbedding",
    "SiluAndMul",
    "VocabEmbedding",
]
