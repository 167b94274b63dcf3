"""Programmatic dependent launch (``attention/triton/pdl.py``): when kernels launch with it, and
that a chain of dependent PDL kernels in a CUDA graph computes exactly what serial launches do.

A kernel that read its input before ``gdc_wait`` would see the previous replay's values (the
graph's buffers are static), so replays with fresh inputs compared bit for bit against PDL-off
launches catch a missing wait.
"""

from __future__ import annotations

import pytest
import torch
from sglang.engine.attention.triton import pdl

pytestmark = pytest.mark.integration


def test_pdl_only_on_cuda_and_switchable(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(4)
    assert pdl.pdl_launch(x) is False
    assert pdl.pdl_options(x) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setenv("SGLANG_DISABLE_PDL", "1")
    pdl.set_pdl(None)
    try:
        if torch.cuda.is_available():
            assert pdl.pdl_launch(torch.zeros(1, device="cuda")) is False
    finally:
        pdl.set_pdl(None)


@pytest.mark.gpu
def test_pdl_chain_in_cuda_graph_matches_serial() -> None:
    """8 layers of add+RMSNorm -> gated gate/up product -> down product (the decode MLP chain at
    batch 1, 8B widths), captured with PDL launches; three replays with new inputs equal eager
    PDL-off launches bit for bit."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a Hopper or newer GPU")
    from sglang.engine.layers import fused
    from sglang.engine.layers.fused import triton_ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter, layers = 4096, 14336, 8
    norm_w = [torch.rand(hidden, device="cuda", generator=gen).to(torch.bfloat16) + 0.5 for _ in range(layers)]
    up = [(torch.randn(2 * inter, hidden, device="cuda", generator=gen) * 0.02).to(torch.bfloat16) for _ in range(layers)]
    down = [(torch.randn(hidden, inter, device="cuda", generator=gen) * 0.02).to(torch.bfloat16) for _ in range(layers)]

    def chain(x: torch.Tensor) -> torch.Tensor:
        res = torch.zeros_like(x)
        for i in range(layers):
            h, res = triton_ops.fused_add_rmsnorm(x, res, norm_w[i], 1e-5)
            g = fused.try_skinny_linear(h, up[i], gated=True)
            assert g is not None
            y = fused.try_skinny_linear(g, down[i])
            assert y is not None
            x = y
        return x + res

    fused.set_fused_ops(True)
    try:
        x = torch.randn(1, hidden, device="cuda", generator=gen).to(torch.bfloat16)
        pdl.set_pdl(True)
        assert pdl.pdl_launch(x)
        chain(x)  # compile outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain(x)
        for _ in range(3):
            x.copy_(torch.randn(1, hidden, device="cuda", generator=gen).to(torch.bfloat16))
            g.replay()
            pdl.set_pdl(False)
            ref = chain(x)
            pdl.set_pdl(True)
            torch.cuda.synchronize()
            assert torch.equal(out, ref)
    finally:
        pdl.set_pdl(None)
        fused.set_fused_ops(None)
