"""One Triton launch that writes new tokens' K and V into a layer of the page-major KV pool.

``KVPool.set_kv`` costs several small torch kernels per layer (slot -> row arithmetic, two
``index_copy_``, dtype casts); here one program per token reads its K and V rows (any row stride,
e.g. slices of a fused qkv output), casts them to the pool dtype and stores them at page
``slot // page_size``, offset ``slot % page_size`` of the layer's strided views (``KVPool.get_kv``).
No host synchronisation and a grid of ``T`` programs: safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.engine.attention.triton.common import kv_strides


@triton.jit
def _store_kv_kernel(
    k_buf, v_buf, loc_ptr, k_ptr, v_ptr,
    stride_page, stride_tok, stride_head,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    """Program ``t`` copies ``k[t]``/``v[t]`` ``[NUM_KV_HEADS, HEAD_DIM]`` to slot ``loc[t]``."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    dst = (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_tok
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst_offs = dst + offs_h[:, None] * stride_head + offs_d[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    tl.store(k_buf + dst_offs, k.to(k_buf.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(v_buf + dst_offs, v.to(v_buf.dtype.element_ty), mask=mask)


def _heads(x: torch.Tensor, t: int, kvh: int, d: int) -> torch.Tensor:
    """``x`` as ``[T, KVH, D]`` with a unit head_dim stride (a view; no copy)."""
    x3 = x.view(t, kvh, d)
    if x3.stride(2) != 1:
        raise ValueError(f"K/V rows need a contiguous head_dim, got strides {tuple(x3.stride())}")
    return x3


def store_kv(
    k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write ``k``/``v`` (``[T, KVH * D]`` or ``[T, KVH, D]``, any row stride, any float dtype) into
    token slots ``loc`` ``[T]`` (int32/int64) of one layer's views ``k_buf``/``v_buf``
    ``[pages, page_size, KVH, D]`` (``KVPool.get_kv``), cast to the pool dtype. One kernel launch;
    the same result as ``KVPool.set_kv``."""
    _, page_size, kvh, d = k_buf.shape
    t = loc.shape[0]
    if t == 0:
        return
    stride_page, stride_tok, stride_head = kv_strides(k_buf, v_buf)
    k3, v3 = _heads(k, t, kvh, d), _heads(v, t, kvh, d)
    block_h, block_d = triton.next_power_of_2(kvh), triton.next_power_of_2(d)
    _store_kv_kernel[(t,)](
        k_buf, v_buf, loc, k3, v3,
        stride_page, stride_tok, stride_head,
        k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        NUM_KV_HEADS=kvh, HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d, PAGE_SIZE=page_size,
        num_warps=4 if block_h * block_d <= 2048 else 8,
    )
