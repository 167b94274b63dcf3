"""Programmatic dependent launch (PDL) for the decode-path Triton kernels (Hopper and later).

A decode step at batch 1 is ~340 short kernels; without PDL each waits for its predecessor to
finish completely before it is even scheduled, which costs ~1.3 us of idle GPU per boundary
(0.45 ms per step on an H100 for the Llama-3-8B shape). With PDL a kernel is launched while its
predecessor still runs: its programs become resident as soon as every program of the predecessor
has started (``gdc_launch_dependents``), and wait in ``gdc_wait`` until the predecessor has
finished and its writes are visible. Launch latency and the predecessor's tail then overlap.

The rule for a kernel launched with PDL: :func:`pdl_enter` (or :func:`pdl_release` then
:func:`pdl_wait`) before it touches any memory that an earlier kernel writes or reads (inputs,
outputs, scratch reused from the allocator). Reads of memory no kernel writes (weights) may come
before the wait. Transitively safe: a kernel completes only after its own wait returned.

:func:`pdl_launch` decides per launch: CUDA tensors on compute capability 9.0 or later, not in
the interpreter, and not disabled by ``SGLANG_DISABLE_PDL=1`` (read on the first call);
:func:`set_pdl` overrides that (tests, benchmarks). CUDA-graph capture records PDL launches as
programmatic edges, so replays keep the overlap.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from sglang.engine.attention.triton.common import interpreting

_enabled: bool | None = None  # None: read SGLANG_DISABLE_PDL on the next call
_capable: dict[int, bool] = {}


def set_pdl(enabled: bool | None) -> None:
    """Force PDL launches on (where the device supports them) or off; ``None`` re-reads the env."""
    global _enabled
    _enabled = enabled


def pdl_launch(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL (pass as ``PDL=`` and ``launch_pdl=``)."""
    global _enabled
    if not t.is_cuda:
        return False
    if _enabled is None:
        _enabled = os.environ.get("SGLANG_DISABLE_PDL", "0") in ("", "0")
    if not _enabled:
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    ok = _capable.get(index)
    if ok is None:
        ok = _capable[index] = torch.cuda.get_device_capability(index) >= (9, 0) and not interpreting()
    return ok


def pdl_options(t: torch.Tensor) -> dict[str, bool]:
    """Launch options for a kernel with a ``PDL: tl.constexpr`` parameter, for tensors like ``t``."""
    on = pdl_launch(t)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel's programs launch once every program of this one has called this."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the previous kernel has finished and its memory writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """:func:`pdl_release` then :func:`pdl_wait`: the first statement of a PDL kernel."""
    pdl_release(PDL)
    pdl_wait(PDL)
