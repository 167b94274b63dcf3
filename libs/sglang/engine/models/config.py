"""ModelInfo: the few numbers about a model that the runner, KV pool and scheduler need."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang.engine.models.registry import resolve_architecture

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype an HF config declares (``dtype``, or legacy ``torch_dtype``), or None."""
    value = getattr(config, "dtype", None)
    if value is None:
        value = config.__dict__.get("torch_dtype")
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r} in model config")
    return _DTYPES[name]


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def layer_sliding_windows(config: Any) -> list[int | None]:
    """Per-layer sliding window (None = full attention): Qwen2/3-style ``layer_types`` pick the
    layers that use ``sliding_window``; without ``layer_types`` (Mistral) every layer uses it."""
    num_layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    if window is None:
        return [None] * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [int(window) if t == "sliding_attention" else None for t in layer_types]
    return [int(window)] * num_layers


@dataclass
class ModelInfo:
    """Shape and metadata of a decoder-only model, read from its HF config.

    ``eos_token_ids`` merges config.json's ``eos_token_id`` with ``generation_config.json``'s (when
    the folder has one), in that order, without duplicates. ``dtype`` is what the config declares
    (None when it declares nothing), not necessarily the dtype the model was loaded in.
    ``sliding_windows`` has one entry per layer (None = full attention).
    """

    architecture: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    dtype: torch.dtype | None
    eos_token_ids: list[int]
    tie_word_embeddings: bool
    sliding_windows: list[int | None]

    @classmethod
    def from_config(cls, config: Any, model_path: str | Path | None = None) -> ModelInfo:
        """Build from an HF config; ``model_path`` adds eos ids from generation_config.json."""
        num_heads = int(config.num_attention_heads)
        num_layers = int(config.num_hidden_layers)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        eos = _as_id_list(getattr(config, "eos_token_id", None))
        if model_path is not None:
            gen_path = Path(model_path) / "generation_config.json"
            if gen_path.is_file():
                gen = json.loads(gen_path.read_text())
                eos += [i for i in _as_id_list(gen.get("eos_token_id")) if i not in eos]
        return cls(
            architecture=resolve_architecture(config),
            model_type=str(getattr(config, "model_type", "")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            context_length=int(config.max_position_embeddings),
            dtype=config_dtype(config),
            eos_token_ids=list(dict.fromkeys(eos)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_windows=layer_sliding_windows(config),
        )
