"""The grammar mask of one engine step: one batched bitmask, filled on the CPU, applied in one call.

``BitmaskFiller.fill`` runs right after the forward is launched and before anything waits for the
logits, so on a GPU the per-row CPU work (a few microseconds a row) overlaps the forward. ``apply``
then copies the bitmask to the logits' device and masks every grammar row at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang.engine.constrained.base import GrammarBackend, GrammarMatcher


@dataclass
class GrammarMask:
    """Output of the mask phase: ``bitmask[i]`` is filled for each sampled row ``i`` in ``rows``
    (rows without a grammar hold stale bits and are never read). CPU, int32."""

    backend: GrammarBackend
    bitmask: torch.Tensor
    rows: list[int]


class BitmaskFiller:
    """Owns a reusable CPU bitmask (pinned when the logits live on CUDA). Scheduler thread only.

    Reuse is safe because every step synchronises on its sampled tokens before the next ``fill``,
    so the previous step's copy to the device has completed.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._buf: torch.Tensor | None = None
        self._backend: GrammarBackend | None = None

    def fill(self, matchers: Sequence[GrammarMatcher | None]) -> GrammarMask | None:
        """Fill the rows of ``matchers`` that are not None; None when no row has a grammar."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        backend = matchers[rows[0]].backend  # type: ignore[union-attr]
        buf = self._buffer(backend, len(matchers))
        backend.fill_bitmask([matchers[i] for i in rows], buf, rows)  # type: ignore[misc]
        return GrammarMask(backend, buf[: len(matchers)], rows)

    def _buffer(self, backend: GrammarBackend, n: int) -> torch.Tensor:
        if self._buf is None or self._backend is not backend or self._buf.shape[0] < n:
            cap = max(n, 2 * self._buf.shape[0] if self._buf is not None else 8)
            buf = backend.allocate_bitmask(cap)
            if self.device.type == "cuda":
                buf = buf.pin_memory()
            self._buf, self._backend = buf, backend
        return self._buf

    @staticmethod
    def apply(logits: torch.Tensor, mask: GrammarMask | None) -> None:
        """Mask ``logits`` (the sampled rows, ``[B, V]``) IN PLACE."""
        if mask is None:
            return
        bitmask = mask.bitmask
        if bitmask.device != logits.device:
            bitmask = bitmask.to(logits.device, non_blocking=True)
        mask.backend.apply_bitmask(logits, bitmask, mask.rows)
