"""Skinny matmul for decode: ``y = x @ W.T (+ b)`` with few rows in ``x`` (a decode batch of 1-16).

At batch 1 a linear layer is a matrix-vector product bound by reading ``W`` once from HBM. cuBLAS
picks split-K kernels plus a reduction for these shapes and reaches 1.6-2.8 TB/s on an H100
(measured: ``benchmarks/gemv.py``); this kernel streams ``W`` in ``[BLOCK_N, BLOCK_K]`` tiles,
one program per ``BLOCK_N`` output columns, with a software-pipelined K loop, and needs no second
kernel. Two inner products:

* ``dot``: ``tl.dot`` of the padded ``[16, BLOCK_K]`` input tile with the weight tile (tensor
  cores; any ``M <= 16``);
* ``fma``: ``M == 1`` only, ``sum(w * x)`` on the CUDA cores, which allows ``BLOCK_N`` below 16.

Both accumulate in float32 and round once to the output dtype, like cuBLAS. Launches depend
only on shapes (CUDA-graph capturable). ``K`` must be a multiple of ``BLOCK_K``
(:func:`supported` checks, the caller falls back to ``F.linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    kind: str = "dot"  # "dot" or "fma" (M == 1)


@triton.jit
def _gemv_dot_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_TILES: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(K_TILES):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        if DOT_FP32:  # the interpreter (numpy has no bfloat16 matmul)
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out = acc.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)  # rounded as F.linear(...).to(y)
    tl.store(y_ptrs, out, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemv_fma_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, stride_wn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_k
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in range(K_TILES):
        x = tl.load(x_ptrs).to(tl.float32)
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=n_mask)


def default_config(m: int, n: int, k: int) -> GemvConfig:
    """The configuration picked for an ``[m, k] x [n, k]^T`` product: the fastest of the sweep in
    ``benchmarks/gemv.py --sweep`` on an H100 for the Llama-3-8B decode shapes (M = 1)."""
    if k >= 8192:  # long rows (down_proj): wide K tiles
        return GemvConfig(block_n=32, block_k=512, num_warps=4, num_stages=3, kind="dot")
    if m == 1 and n >= 6144:  # many rows (qkv, gate_up, lm_head): 4 rows per program on the CUDA cores
        return GemvConfig(block_n=4, block_k=1024, num_warps=4, num_stages=3, kind="fma")
    return GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=4, kind="dot")


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
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x [M, K] @ w [N, K].T + bias`` for ``M <= 16`` (check :func:`supported` first). With
    ``out_dtype`` (e.g. float32 logits) the result is rounded to x's dtype first, then stored in
    ``out_dtype``: the values of ``F.linear(x, w, bias).to(out_dtype)`` without a second kernel."""
    m, k = x.shape
    n = w.shape[0]
    cfg = cfg or default_config(m, n, k)
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n),)
    b = bias if bias is not None else w  # never read without HAS_BIAS
    if cfg.kind == "fma":
        _gemv_fma_kernel[grid](
            x, w, b, y, n, w.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, K_TILES=k // cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        _gemv_dot_kernel[grid](
            x, w, b, y, m, n, x.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            K_TILES=k // cfg.block_k, DOT_FP32=not x.is_cuda,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y
