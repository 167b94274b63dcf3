"""KV cache sizing and layout."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CacheSettings(BaseSettings):
    """Paged KV cache. Env: ``SGLANG_PAGE_SIZE`` etc."""

    model_config = SettingsConfigDict(env_prefix="SGLANG_", extra="ignore", validate_assignment=True)

    page_size: int = Field(default=16, ge=1, le=1024)
    """Tokens per KV page; the unit of allocation (and of prefix sharing, later)."""

    max_total_tokens: int | None = Field(default=None, ge=1, le=100_000_000)
    """KV capacity in tokens (rounded down to whole pages). None: sized from memory."""

    mem_fraction_static: float = Field(default=0.85, gt=0.0, le=0.99)
    """GPU: fraction of device memory for weights + KV pool."""

    cpu_kv_cache_gib: float = Field(default=1.0, gt=0.0, le=1024.0)
    """CPU: memory for the KV pool when ``max_total_tokens`` is not given."""

    disable_radix_cache: bool = False
    """Turn the prefix cache off (every prompt is computed in full), for comparison."""

    eviction_policy: str = Field(default="lru", pattern=r"^(lru|lfu)$")
    """Which unlocked cached prefixes go first when pages run short."""

    kv_cache_dtype: str = Field(default="auto", pattern=r"^(auto|float32|bfloat16|float16)$")
    """KV dtype; ``auto`` follows the model dtype."""
