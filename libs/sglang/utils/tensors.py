"""Host-to-device copies that never stall the host on the GPU stream."""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``. On CUDA the data goes through pinned
    memory with a non-blocking copy: a copy from pageable memory first waits for everything queued
    on the stream, which would serialise the host with the GPU (and defeat overlap scheduling)."""
    dev = torch.device(device)
    if isinstance(values, torch.Tensor) and (dev.type != "cuda" or values.device.type == "cuda"):
        return values.to(device=dev, dtype=dtype)  # nothing to pin: already there, or not going to CUDA
    if dev.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=dev)
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return host.to(dtype).pin_memory().to(dev, non_blocking=True)
