"""Request-to-token table: for each request slot, the KV slot of each of its tokens.

Row ``r`` holds the slots of request ``r``'s tokens in order; attention backends gather K/V with it.
A request also keeps its own page list (the owner of the pages); this table is the dense view.
"""

from __future__ import annotations

import torch

from sglang.utils.tensors import to_device


class ReqToTokenPool:
    """Fixed table ``[max_reqs, max_context_len]`` of int32 slots plus a free list of rows."""

    def __init__(self, max_reqs: int, max_context_len: int, device: torch.device | str) -> None:
        self.max_reqs = max_reqs
        self.max_context_len = max_context_len
        self.table = torch.zeros((max_reqs, max_context_len), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_reqs - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int:
        if not self._free_rows:
            raise RuntimeError("no free request slots; raise max_running_requests")
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        if row in self._free_rows:
            raise ValueError(f"double free of request row {row}")
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Record ``slots`` as the KV slots of tokens ``start .. start+len(slots)`` of ``row``."""
        if slots.device != self.table.device:
            slots = to_device(slots, self.table.dtype, self.table.device)
        self.table[row, start : start + slots.numel()] = slots
