"""Batching and admission limits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SchedulerSettings(BaseSettings):
    """Continuous batching limits. Env: ``SGLANG_MAX_RUNNING_REQUESTS`` etc."""

    model_config = SettingsConfigDict(env_prefix="SGLANG_", extra="ignore", validate_assignment=True)

    max_running_requests: int = Field(default=256, ge=1, le=65536)
    """Most requests in the running batch at once."""

    chunked_prefill_size: int = Field(default=2048, ge=1, le=1_048_576)
    """Most prompt tokens computed in one step; longer prompts are prefilled in chunks."""

    max_prefill_tokens: int = Field(default=16384, ge=1, le=1_048_576)
    """Most new tokens in one prefill batch (across requests)."""

    schedule_policy: Literal["fcfs", "lpm"] = "fcfs"
    """Order in which waiting requests are admitted: arrival (``fcfs``) or longest cached prefix
    first (``lpm``)."""

    new_token_ratio: float = Field(default=0.7, ge=0.0, le=1.0)
    """Fraction of each running request's remaining max_new_tokens reserved at admission, so that
    admission does not immediately force retraction."""

    attention_backend: str = Field(default="auto", min_length=1)
    """Attention backend name from the registry (``torch_native``, ``triton``), or ``auto``:
    ``triton`` on a CUDA device when triton is installed, else ``torch_native``."""

    gc_freeze: bool = True
    """After the first engine's start-up in a process, move every object alive then (modules,
    torch and Triton internals, the weights' Python wrappers: ~350k) to the garbage collector's
    permanent generation, so the full collections that serving triggers do not rescan them
    (each one held the scheduler thread, and with it the GPU, for ~100 ms; after: ~2 ms)."""

    disable_cuda_graph: bool = False
    """Run decode eagerly instead of replaying captured CUDA graphs (graphs need a CUDA device and
    an attention backend that supports capture, e.g. ``triton``; otherwise decode is eager anyway)."""

    cuda_graph_max_bs: int = Field(default=256, ge=1, le=4096)
    """Largest decode batch captured in a CUDA graph (capped at ``max_running_requests``); larger
    decode batches run eagerly."""

    overlap_schedule: Literal["auto", "on", "off"] = "auto"
    """Overlap scheduling: schedule decode step N+1 and launch it before reading step N's sampled
    tokens on the host, so the CPU's per-step work hides behind the GPU. ``auto``: on for CUDA
    devices (on CPU the forward is synchronous and there is nothing to hide)."""

    check_integrity_when_idle: bool = True
    """Run the allocator's ``check_integrity()`` each time the engine goes idle."""
