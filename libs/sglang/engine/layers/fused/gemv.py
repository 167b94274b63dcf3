"""Skinny matmul for decode: ``y = x @ W.T (+ b)`` with few rows in ``x`` (a decode batch of 1-16).

At batch 1 a linear layer is a matrix-vector product bound by reading ``W`` once from HBM. cuBLAS
picks split-K kernels plus a reduction for these shapes and reaches 1.6-2.8 TB/s on an H100
(measured: ``benchmarks/gemv.py``); this kernel streams ``W`` in ``[BLOCK_N, BLOCK_K]`` tiles,
one program per ``BLOCK_N`` output columns, with a software-pipelined K loop, and needs no second
kernel. Two inner products:

* ``dot``: ``tl.dot`` of the padded ``[16, BLOCK_K]`` input tile with the weight tile (tensor
  cores; any ``M <= 16``);
* ``fma``: ``M == 1`` only, ``sum(w * x)`` on the CUDA cores, which allows ``BLOCK_N`` below 16.

Both accumulate in float32 and round once to the output dtype, like cuBLAS. With programmatic
dependent launch (``attention/triton/pdl.py``) a program loads its first weight tile before it
waits for the previous kernel, and lets the next kernel launch once its weight loop is done: the
weight stream barely pauses between kernels (32 layers of the 8B shape at batch 1 in a CUDA graph
on an H100: 4.70 -> 4.61 ms, 0.99 of the copy-bandwidth floor). Launches depend
only on shapes (CUDA-graph capturable). ``K`` must be a multiple of ``BLOCK_K``
(:func:`supported` checks, the caller falls back to ``F.linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang.engine.attention.triton.common import round_to
from sglang.engine.attention.triton.pdl import pdl_options, pdl_release, pdl_wait

MAX_ROWS = 16


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    kind: str = "dot"  # "dot" or "fma" (M == 1)


@triton.jit
def _weight_rows(pid, N, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """The weight rows of program ``pid`` and which exist. Plain: ``BLOCK_N`` consecutive rows.
    ``GATED`` (``W = [gate; up]``, ``N`` outputs): gate rows ``pid * H ..`` then the matching up
    rows ``N + pid * H ..`` (``H = BLOCK_N / 2``)."""
    r = tl.arange(0, BLOCK_N)
    if GATED:
        H: tl.constexpr = BLOCK_N // 2
        col = pid * H + r % H
        return (r // H) * N + col, col < N
    col = pid * BLOCK_N + r
    return col, col < N


@triton.jit
def _store_out(y, x_ptr, y_ptr, rows_off, m_mask, pid, N, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """Round ``y`` ``[R, BLOCK_N]`` (fp32, bias added) as ``F.linear`` would and store it; ``GATED``:
    ``silu(gate) * up`` with the roundings of ``F.linear`` followed by ``silu_and_mul``."""
    dtype = x_ptr.dtype.element_ty
    R: tl.constexpr = y.shape[0]
    if GATED:
        H: tl.constexpr = BLOCK_N // 2
        gate, up = tl.split(tl.permute(tl.reshape(y, [R, 2, H]), [0, 2, 1]))
        gate = gate.to(dtype).to(tl.float32)
        up = up.to(dtype).to(tl.float32)
        out = round_to(gate / (1.0 + tl.exp(-gate)), dtype) * up
        cols = pid * H + tl.arange(0, H)
    else:
        out = y
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    out = out.to(dtype).to(y_ptr.dtype.element_ty)  # rounded as F.linear(...).to(y)
    tl.store(y_ptr + rows_off[:, None] + cols[None, :], out, mask=m_mask[:, None] & (cols < N)[None, :])


@triton.jit
def _dot_acc(x, w, acc, DOT_FP32: tl.constexpr):
    """``acc + x @ w.T`` on the tensor cores; ``DOT_FP32``: in float32 (the interpreter: numpy has no
    bfloat16 matmul)."""
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _gemv_dot_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_TILES: tl.constexpr, DOT_FP32: tl.constexpr, GATED: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    rows, n_mask = _weight_rows(pid, N, BLOCK_N, GATED)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    PEELED: tl.constexpr = 1 if PDL else 0
    if PDL:  # PDL: the first weight tile is loaded before waiting for the previous kernel
        w0 = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        pdl_wait(PDL)
        acc = _dot_acc(tl.load(x_ptrs, mask=m_mask[:, None], other=0.0), w0, acc, DOT_FP32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    for _ in range(K_TILES - PEELED):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        acc = _dot_acc(x, w, acc, DOT_FP32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    pdl_release(PDL)  # the next kernel's programs may start while this one finishes
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _store_out(acc, x_ptr, y_ptr, offs_m * stride_ym, m_mask, pid, N, BLOCK_N, GATED)


@triton.jit
def _gemv_fma_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, stride_wn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
    GATED: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    rows, n_mask = _weight_rows(pid, N, BLOCK_N, GATED)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_k
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    PEELED: tl.constexpr = 1 if PDL else 0
    if PDL:  # PDL: the first weight tile is loaded before waiting for the previous kernel
        w0 = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        pdl_wait(PDL)
        acc += w0.to(tl.float32) * tl.load(x_ptrs).to(tl.float32)[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    for _ in range(K_TILES - PEELED):
        x = tl.load(x_ptrs).to(tl.float32)
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    pdl_release(PDL)  # the next kernel's programs may start while this one finishes
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
    one = tl.arange(0, 1)
    _store_out(y[None, :], x_ptr, y_ptr, one * 0, one == 0, pid, N, BLOCK_N, GATED)


def default_config(m: int, n: int, k: int, gated: bool = False) -> GemvConfig:
    """The configuration picked for an ``[m, k] x [n, k]^T`` product (``gated``: ``n`` counts gate
    and up rows): the fastest of ``benchmarks/gemv.py --sweep [--gated]`` on an H100 for the
    Llama-3-8B and Qwen3-0.6B decode shapes.

    ``M == 1``: one weight row per program (two when gated: a gate row and its up row) on the CUDA
    cores, 8 warps; more programs keep every SM streaming until the end (8B o_proj: 1.89 -> 2.82
    TB/s, down_proj 2.67 -> 3.01, qkv 2.69 -> 2.93 against 4-32 rows per program). Short rows
    (``k <= 1024``) take 4 rows per program."""
    if m == 1 and k % 1024 == 0:
        if k <= 1024:
            return GemvConfig(block_n=4, block_k=1024, num_warps=8, num_stages=3, kind="fma")
        if k % 2048 == 0 and (k >= 8192 or gated):  # long rows: 2048-wide tiles
            return GemvConfig(block_n=2 if gated else 1, block_k=2048, num_warps=8, num_stages=2, kind="fma")
        return GemvConfig(block_n=2 if gated else 1, block_k=1024, num_warps=8, num_stages=3, kind="fma")
    # M = 2..16 (``--sweep-rows 4 8 16``): 2-4% over the earlier 256-512-wide tiles at 3-4 stages
    if k >= 8192:  # long rows (down_proj)
        return GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=6, kind="dot")
    return GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=3 if gated else 6, kind="dot")


def supported(x: torch.Tensor, w: torch.Tensor, cfg: GemvConfig | None = None) -> bool:
    m, k = x.shape
    cfg = cfg or default_config(m, w.shape[0], k)
    return (
        x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16)
        and 1 <= m <= MAX_ROWS and k == w.shape[1] and k % cfg.block_k == 0
        and x.stride(1) == 1 and w.stride(1) == 1 and (cfg.kind == "dot" or m == 1)
    )


def skinny_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, cfg: GemvConfig | None = None,
    out_dtype: torch.dtype | None = None, gated: bool = False,
) -> torch.Tensor:
    """``x [M, K] @ w [N, K].T + bias`` for ``M <= 16`` (check :func:`supported` first). With
    ``out_dtype`` (e.g. float32 logits) the result is rounded to x's dtype first, then stored in
    ``out_dtype``: the values of ``F.linear(x, w, bias).to(out_dtype)`` without a second kernel.

    ``gated``: ``w`` is ``[gate; up]`` (``2n`` rows) and the result is ``silu(gate) * up``
    ``[M, n]``, bit for bit ``silu_and_mul(skinny_linear(x, w, bias))`` in one kernel (each
    program reads matching gate and up rows; the configuration is that of the whole ``w``)."""
    m, k = x.shape
    cfg = cfg or default_config(m, w.shape[0], k, gated)
    if gated and (w.shape[0] % 2 or cfg.block_n % 2 or (cfg.kind == "dot" and cfg.block_n < 32)):
        raise ValueError(f"a gated product needs an even row count and block_n (>= 32 for dot), got {w.shape[0]}, {cfg}")
    n = w.shape[0] // 2 if gated else w.shape[0]
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n // 2 if gated else cfg.block_n),)
    b = bias if bias is not None else w  # never read without HAS_BIAS
    pdl = pdl_options(x)
    if cfg.kind == "fma":
        _gemv_fma_kernel[grid](
            x, w, b, y, n, w.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, K_TILES=k // cfg.block_k,
            GATED=gated, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
        )
    else:
        _gemv_dot_kernel[grid](
            x, w, b, y, m, n, x.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            K_TILES=k // cfg.block_k, DOT_FP32=not x.is_cuda, GATED=gated,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
        )
    return y
