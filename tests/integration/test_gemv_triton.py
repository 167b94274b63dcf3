"""The skinny matmul (``layers/fused/gemv.py``) against ``F.linear`` in float32, and when the
layers use it.

Every case computes ``x [M, K] @ W [N, K].T (+ b)`` with both kernels (``dot`` for M up to 16,
``fma`` for M = 1), N not a multiple of the tile (masked rows), and compares with the float32
product rounded to the output dtype: the only differences allowed are one rounding step of the
accumulation order (|diff| <= 1 ulp of the output's magnitude). ``interpret`` runs in Triton's CPU
interpreter (a worker subprocess); ``cuda`` is marked gpu and adds CUDA-graph capture and the
8B decode shapes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.triton_worker import device_runner, interpreter_fixture, serve

pytestmark = pytest.mark.integration

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def gemv_case(
    device: str, m: int, n: int, k: int, kind: str, block_n: int, block_k: int, dtype: str = "bfloat16",
    bias: bool = False, out_dtype: str | None = None, seed: int = 0,
) -> float:
    """Max |ours - reference| in units of the reference's rounding step (ulp at its max magnitude)."""
    from sglang.engine.layers.fused.gemv import GemvConfig, skinny_linear

    dev, dt = torch.device(device), DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dt).to(dev)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dt).to(dev)
    b = torch.randn(n, generator=gen).to(dt).to(dev) if bias else None
    cfg = GemvConfig(block_n, block_k, 4, 2, kind)
    out_dt = DTYPES[out_dtype] if out_dtype else None
    got = skinny_linear(x, w, b, cfg=cfg, out_dtype=out_dt)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dt)
    assert got.shape == (m, n) and got.dtype == (out_dt or dt)
    ulp = float(torch.finfo(dt).eps) * float(ref.float().abs().max())
    return float((got.float() - ref.float()).abs().max()) / ulp


def gated_case(device: str, m: int, n: int, k: int, kind: str, block_n: int, block_k: int, bias: bool) -> float:
    """The gated product (``silu(gate) * up`` in the matmul's epilogue) against the two kernels it
    replaces, skinny matmul then ``silu_and_mul``: returns the number of differing elements (0:
    the same bits). Also checks it is close to the float32 reference."""
    from sglang.engine.layers.fused import triton_ops
    from sglang.engine.layers.fused.gemv import GemvConfig, skinny_linear

    dev, dt = torch.device(device), torch.bfloat16
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(m, k, generator=gen).to(dt).to(dev)
    w = (torch.randn(2 * n, k, generator=gen) * 0.05).to(dt).to(dev)
    b = torch.randn(2 * n, generator=gen).to(dt).to(dev) if bias else None
    cfg = GemvConfig(block_n, block_k, 4, 2, kind)
    got = skinny_linear(x, w, b, cfg=cfg, gated=True)
    two = triton_ops.silu_and_mul(skinny_linear(x, w, b, cfg=cfg))
    assert got.shape == (m, n) and got.dtype == dt
    full = F.linear(x.float(), w.float(), None if b is None else b.float())
    ref = F.silu(full[:, :n]) * full[:, n:]
    assert torch.allclose(got.float(), ref, atol=0.05, rtol=0.05)
    return float((got != two).sum())


CASES: dict[str, Callable[..., float]] = {"gemv_case": gemv_case, "gated_case": gated_case}


def _setup_worker() -> None:
    from tests.integration.test_fused_ops import _round_bf16_like_gpu

    _round_bf16_like_gpu()


interpreter = interpreter_fixture(__file__)
Run = Callable[..., float]


@pytest.fixture
def run(request: pytest.FixtureRequest) -> Run:
    return device_runner(request, CASES)


def _params(device: str) -> list[Any]:
    marks = [pytest.mark.gpu] if device == "cuda" else []
    cases = [  # (m, n, k, kind, block_n, block_k, bias, out_dtype)
        (1, 40, 512, "dot", 16, 256, False, None),
        (3, 40, 512, "dot", 32, 128, True, None),
        (16, 70, 256, "dot", 16, 256, False, None),
        (1, 37, 1024, "fma", 4, 512, True, None),
        (1, 64, 2048, "fma", 8, 1024, False, "float32"),
        (1, 13, 2048, "fma", 1, 1024, True, None),
        (5, 33, 512, "dot", 16, 512, False, "float32"),
    ]
    return [pytest.param(device, *c, marks=marks, id=f"{device}-m{c[0]}-n{c[1]}-k{c[2]}-{c[3]}{c[4]}x{c[5]}"
                         f"{'-bias' if c[6] else ''}{'-' + c[7] if c[7] else ''}") for c in cases]


@pytest.mark.parametrize(("device", "m", "n", "k", "kind", "block_n", "block_k", "bias", "out_dtype"),
                         _params("interpret") + _params("cuda"))
def test_skinny_matches_linear(
    run: Run, device: str, m: int, n: int, k: int, kind: str, block_n: int, block_k: int, bias: bool,
    out_dtype: str | None,
) -> None:
    err = run("gemv_case", m=m, n=n, k=k, kind=kind, block_n=block_n, block_k=block_k, bias=bias,
              out_dtype=out_dtype)
    assert err <= 1.0


def _gated_params(device: str) -> list[Any]:
    marks = [pytest.mark.gpu] if device == "cuda" else []
    cases = [  # (m, n, k, kind, block_n, block_k, bias): n outputs, 2n weight rows
        (1, 37, 1024, "fma", 4, 512, False),
        (1, 21, 2048, "fma", 2, 1024, True),
        (1, 64, 2048, "fma", 8, 1024, True),
        (3, 40, 512, "dot", 32, 256, True),
        (16, 70, 256, "dot", 64, 256, False),
    ]
    return [pytest.param(device, *c, marks=marks, id=f"{device}-m{c[0]}-n{c[1]}-k{c[2]}-{c[3]}{c[4]}x{c[5]}"
                         f"{'-bias' if c[6] else ''}") for c in cases]


@pytest.mark.parametrize(("device", "m", "n", "k", "kind", "block_n", "block_k", "bias"),
                         _gated_params("interpret") + _gated_params("cuda"))
def test_gated_matches_two_kernels(
    run: Run, device: str, m: int, n: int, k: int, kind: str, block_n: int, block_k: int, bias: bool
) -> None:
    assert run("gated_case", m=m, n=n, k=k, kind=kind, block_n=block_n, block_k=block_k, bias=bias) == 0


def test_gated_needs_even_rows() -> None:
    from sglang.engine.layers.fused.gemv import GemvConfig, skinny_linear

    x, w = torch.zeros(1, 256, dtype=torch.bfloat16), torch.zeros(7, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="even row count"):
        skinny_linear(x, w, cfg=GemvConfig(4, 256, 4, 2, "fma"), gated=True)


@pytest.mark.parametrize("kind", ["fma", "dot"])
def test_kernels_compile_for_sm90(kind: str) -> None:
    """Compile the GPU path to an H100 cubin without a GPU, plain and gated, with and without PDL
    (the first weight tile loaded before ``griddepcontrol.wait``)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("kernels are interpreted in this process")
    from sglang.engine.layers.fused import gemv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    kernel = gemv._gemv_fma_kernel if kind == "fma" else gemv._gemv_dot_kernel
    for gated, pdl in ((False, False), (True, True), (False, True)):
        consts = {"HAS_BIAS": gated, "BLOCK_N": 2 if kind == "fma" else 32, "BLOCK_K": 1024 if kind == "fma" else 256,
                  "K_TILES": 4, "GATED": gated, "PDL": pdl}
        if kind == "dot":
            consts |= {"BLOCK_M": 16, "DOT_FP32": False}
        sig = {n: "constexpr" if n in consts else "*bf16" if n.endswith("_ptr") else "i32" for n in kernel.arg_names}
        opts = backend.parse_options({"num_warps": 8, "num_stages": 3})
        compiled = triton.compile(ASTSource(kernel, sig, consts), target=target, options=opts.__dict__)
        assert compiled.asm["cubin"]
        assert ("griddepcontrol.wait" in compiled.asm["ptx"]) == pdl


def test_layers_use_it_only_where_it_pays() -> None:
    """CPU tensors, batches above 16 rows, weights below 16M elements (1M at one row) go to F.linear."""
    from sglang.engine.layers import fused

    w = torch.zeros(8, 64)
    assert fused.try_skinny_linear(torch.zeros(1, 64), w) is None  # CPU
    if torch.cuda.is_available():
        big = torch.zeros(4096, 4096, dtype=torch.bfloat16, device="cuda")
        assert fused.try_skinny_linear(torch.zeros(17, 4096, dtype=torch.bfloat16, device="cuda"), big) is None
        small = torch.zeros(1024, 2048, dtype=torch.bfloat16, device="cuda")
        assert fused.try_skinny_linear(torch.zeros(2, 2048, dtype=torch.bfloat16, device="cuda"), small) is None
        assert fused.try_skinny_linear(torch.zeros(1, 2048, dtype=torch.bfloat16, device="cuda"), small) is not None
        tiny = torch.zeros(512, 1024, dtype=torch.bfloat16, device="cuda")
        assert fused.try_skinny_linear(torch.zeros(1, 1024, dtype=torch.bfloat16, device="cuda"), tiny) is None


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8, 16])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)])
def test_8b_decode_shapes_cuda(m: int, n: int, k: int) -> None:
    """The Llama-3-8B decode shapes through the layers' dispatch (the configs the engine runs),
    inside a CUDA graph, against F.linear in float32."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sglang.engine.layers import fused

    fused.set_fused_ops(True)
    try:
        gen = torch.Generator(device="cuda").manual_seed(m + n)
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        out = fused.try_skinny_linear(x, w)
        assert out is not None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fused.try_skinny_linear(x, w)
        x.copy_(torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16))
        g.replay()
        ref = F.linear(x.float(), w.float()).to(torch.bfloat16).float()
        ulp = float(torch.finfo(torch.bfloat16).eps) * float(ref.abs().max())
        assert out is not None and float((out.float() - ref).abs().max()) <= ulp
    finally:
        fused.set_fused_ops(None)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8, 16])
def test_gated_8b_shape_cuda(m: int) -> None:
    """The 8B gate/up projection through the layers' dispatch with ``gated=True``: the same bits as
    the skinny matmul with the same configuration followed by ``silu_and_mul``, inside a CUDA graph
    with PDL launches. (The configuration differs from the plain product's default at one row:
    other tiles, another summation order.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sglang.engine.layers import fused
    from sglang.engine.layers.fused import gemv, triton_ops

    fused.set_fused_ops(True)
    try:
        gen = torch.Generator(device="cuda").manual_seed(m)
        x = torch.randn(m, 4096, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(2 * 14336, 4096, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        assert fused.try_skinny_linear(x, w, gated=True) is not None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fused.try_skinny_linear(x, w, gated=True)
        x.copy_(torch.randn(m, 4096, device="cuda", generator=gen).to(torch.bfloat16))
        g.replay()
        cfg = gemv.default_config(m, w.shape[0], 4096, gated=True)  # the plain product with the same tiles
        plain = gemv.skinny_linear(x, w, cfg=cfg)
        assert out is not None
        assert torch.equal(out, triton_ops.silu_and_mul(plain))
    finally:
        fused.set_fused_ops(None)


if __name__ == "__main__":
    serve(CASES, setup=_setup_worker)
