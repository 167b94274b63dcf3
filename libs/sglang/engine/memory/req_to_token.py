"""Request-to-token table: for each request slot, the KV slot of each of its tokens.

Row ``r`` holds the slots of request ``r``'s tokens in order; attention backends gather K/V with it.
A request also keeps its own page list (the owner of the pages); this table is the dense view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sglang.utils.tensors import to_device


class ReqToTokenPool:
    """Fixed table ``[max_reqs, max_context_len]`` of int64 slots plus a free list of rows.

    Writes are staged on the host and applied to the device table in one copy and one scatter when
    the table is next read (``table``) or :meth:`flush` is called: a decode step at batch 256 with
    16-token pages grows ~16 requests by a page each, and one small host-to-device copy plus a copy
    kernel per request left the GPU waiting for the host (~3 ms/step on an H100). Staged writes
    never overlap (an overlapping write flushes first), so their order does not matter.
    """

    def __init__(self, max_reqs: int, max_context_len: int, device: torch.device | str) -> None:
        self.max_reqs = max_reqs
        self.max_context_len = max_context_len
        self._table = torch.zeros((max_reqs, max_context_len), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_reqs - 1, -1, -1))
        self._idx: list[int] = []  # staged flat indices into the table (row * max_context_len + col)
        self._vals: list[int] = []
        self._staged: dict[int, list[tuple[int, int]]] = {}  # row -> staged [start, end) ranges

    @property
    def table(self) -> torch.Tensor:
        """The device table with every staged write applied (CUDA-graph replays read it without
        this property: the model runner flushes before each forward)."""
        if self._vals:
            self.flush()
        return self._table

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

    def write(self, row: int, start: int, slots: torch.Tensor | Sequence[int]) -> None:
        """Record ``slots`` as the KV slots of tokens ``start .. start+len(slots)`` of ``row``
        (staged; see the class docstring)."""
        vals = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
        end = start + len(vals)
        if not 0 <= row < self.max_reqs or start < 0 or end > self.max_context_len:
            raise ValueError(
                f"write of tokens {start}..{end} to row {row} is outside the table "
                f"[{self.max_reqs}, {self.max_context_len}]"
            )
        if not vals:
            return
        ranges = self._staged.setdefault(row, [])
        if any(lo < end and start < hi for lo, hi in ranges):
            self.flush()  # a staged write covers some of these tokens: apply it first
            ranges = self._staged.setdefault(row, [])
        ranges.append((start, end))
        base = row * self.max_context_len
        self._idx.extend(range(base + start, base + end))
        self._vals.extend(vals)

    def flush(self) -> None:
        """Apply the staged writes to the device table (stream-ordered, no wait on the host)."""
        if not self._vals:
            return
        packed = to_device(self._idx + self._vals, torch.int64, self._table.device).view(2, -1)
        self._table.view(-1)[packed[0]] = packed[1]
        self._idx, self._vals = [], []
        self._staged.clear()
