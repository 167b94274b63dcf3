"""Prefill/decode disaggregation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DisaggSettings(BaseSettings):
    """Which half of a request this engine runs, and how KV pages move. Env: ``SGLANG_*``."""

    model_config = SettingsConfigDict(env_prefix="SGLANG_", extra="ignore", validate_assignment=True)

    disaggregation_mode: Literal["null", "prefill", "decode"] = "null"
    """``null``: prefill and decode here (unified). ``prefill``/``decode``: one half; requests
    carry a ``bootstrap_room`` that pairs the halves."""

    kv_transfer_backend: Literal["nixl"] = "nixl"
    """KV connector from the registry in ``sglang.kv_transfer``."""

    kv_transfer_redis_url: str | None = Field(default=None, min_length=1)
    """Redis where agents publish their metadata and decode workers publish room destinations."""

    kv_transfer_agent_name: str | None = Field(default=None, min_length=1, max_length=200)
    """This engine's transfer agent name (unique in the cluster); default: derived from the pid."""

    kv_transfer_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    """Longest wait for a peer (destination pages, or the KV of a room) before the request fails."""
