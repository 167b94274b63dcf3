"""Model loader: config.json -> model class (registry) -> weights (safetensors or seeded dummy).

Parameters are allocated uninitialised directly on the target device and dtype (our layers use
``torch.empty``), then filled: ``safetensors``/``auto`` copy every checkpoint tensor through the
model's ``load_weights``; ``dummy`` draws seeded random weights. The result is in eval mode with
``requires_grad`` off everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from sglang.engine.layers.norm import RMSNorm
from sglang.engine.models.config import ModelInfo, config_dtype
from sglang.engine.models.registry import get_model_class

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
DUMMY_STD = 0.02


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is parsed by torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, config: Any, device: torch.device) -> torch.dtype:
    """``auto``: the config's dtype on GPU (float32 when it declares none), float32 on CPU."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return config_dtype(config) or torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {['auto', *_DTYPE_NAMES]}")
    return _DTYPE_NAMES[dtype]


def load_config(model_path: str | Path) -> transformers.PretrainedConfig:
    """Read ``config.json`` from a local folder (never the hub)."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model folder {str(path)!r}")
    return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)


def safetensors_files(model_path: str | Path) -> list[Path]:
    """Checkpoint files: the shards named by ``model.safetensors.index.json``, else ``*.safetensors``.

    Raises FileNotFoundError when there are none (or a listed shard is absent)."""
    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists missing shard files: {absent}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {str(path)!r} (only safetensors are supported; "
            "use load_format='dummy' for random weights)"
        )
    return files


def iter_safetensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of every file, with a per-file progress bar."""
    target = str(device) if device.type == "cuda" else "cpu"
    for file in tqdm(files, desc="Loading safetensors", unit="file", disable=None):
        with safe_open(str(file), framework="pt", device=target) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights: normal(0, 0.02) for matrices/embeddings, ones for norm weights,
    zeros for biases. Same seed, class, config, dtype and device -> identical weights."""
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if id(param) in norm_params:
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.normal_(0.0, DUMMY_STD, generator=gen)


def load_model(
    model_path: str, load_format: str = "auto", dtype: str = "auto", device: str = "auto", seed: int = 0
) -> tuple[nn.Module, transformers.PretrainedConfig, ModelInfo]:
    """Build the model of the folder ``model_path`` and fill its weights.

    Raises FileNotFoundError (no config.json / no weights), ValueError (unsupported architecture,
    bad load_format or dtype, checkpoint mismatch). Returns ``(model, hf_config, model_info)``;
    ``model_info.eos_token_ids`` includes generation_config.json's eos ids.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; choose one of {list(LOAD_FORMATS)}")
    config = load_config(model_path)
    info = ModelInfo.from_config(config, model_path)
    model_cls = get_model_class(config)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, dev)
    files = safetensors_files(model_path) if load_format != "dummy" else []

    with dev:
        model = model_cls(config, dtype=torch_dtype)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_weights: Any = model.load_weights
        load_weights(iter_safetensors(files, dev))
    model.eval()
    model.requires_grad_(False)
    return model, config, info
