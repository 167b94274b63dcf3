"""Placeholder input ids of overlap scheduling (see engine/scheduler/overlap.py)."""

from __future__ import annotations

import torch


def resolve_futures(input_ids: torch.Tensor, future_ids: torch.Tensor) -> torch.Tensor:
    """Replace placeholders ``-(row + 1)`` in ``input_ids`` by ``future_ids[row]``, on the device
    and without a host sync; other ids pass through."""
    rows = (-input_ids - 1).clamp_(0, future_ids.numel() - 1)
    return torch.where(input_ids < 0, future_ids.index_select(0, rows), input_ids)
