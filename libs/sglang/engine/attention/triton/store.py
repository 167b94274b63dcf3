"""One Triton launch that writes new tokens' K and V into a layer of the page-major KV pool.

``KVPool.set_kv`` costs several small torch kernels per layer (slot -> row arithmetic, two
``index_copy_``, dtype casts); here one program per token reads its K and V rows (any row stride,
e.g. slices of a fused qkv output), casts them to the pool dtype and stores them at page
``slot // page_size``, offset ``slot % page_size`` of the layer's strided views (``KVPool.get_kv``).
No host synchronisation and a grid of ``T`` programs: safe to capture in a CUDA graph.

``rope_store_kv`` also applies the rotary embedding on the way: q rotated into a new tensor, k
rotated straight into the pool, v copied; the same bits as the rotary kernel followed by
``store_kv``, in one launch instead of two and without writing and re-reading the rotated k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.engine.attention.triton.common import kv_strides, rotate_heads, rotate_q_heads
from sglang.engine.attention.triton.pdl import pdl_enter, pdl_options


@triton.jit
def _store_kv_kernel(
    k_buf, v_buf, loc_ptr, k_ptr, v_ptr,
    stride_page, stride_tok, stride_head,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program ``t`` copies ``k[t]``/``v[t]`` ``[NUM_KV_HEADS, HEAD_DIM]`` to slot ``loc[t]``."""
    pdl_enter(PDL)
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
        num_warps=4 if block_h * block_d <= 2048 else 8, **pdl_options(k_buf),
    )


@triton.jit
def _rope_store_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cache_ptr, q_out, k_buf, v_buf, loc_ptr,
    stride_q, stride_k, stride_v, stride_qo, stride_cache, stride_page, stride_tok,
    num_q_heads, num_kv_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, PASS: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program ``t``: rotate token ``t``'s q heads into ``q_out``, its k heads into slot ``loc[t]``
    of ``k_buf``, copy its v heads to the same slot of ``v_buf`` (heads contiguous everywhere)."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin, offs, mask = rotate_q_heads(t, pos_ptr, cache_ptr, stride_cache, q_ptr, q_out, stride_q, stride_qo,
                                          num_q_heads, HEAD_DIM, HALF, BLOCK_HALF, BLOCK_HQ, PASS, BLOCK_PASS)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    dst = (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_tok
    rotate_heads(k_ptr + t * stride_k, k_buf + dst, num_kv_heads, cos, sin, offs, mask,
                 HEAD_DIM, HALF, BLOCK_HK, PASS, BLOCK_PASS)
    offs_h = tl.arange(0, BLOCK_HK)
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    heads = offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(v_buf + dst + heads, tl.load(v_ptr + t * stride_v + heads, mask=m), mask=m)


def rope_store_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> bool:
    """Whether :func:`rope_store_kv` takes these tensors: one dtype for q, k, v and the pool (the
    rotation rounds in it), rows with contiguous heads, and the pool's heads contiguous per token."""
    kvh, d = k_buf.shape[2], k_buf.shape[3]
    return (
        q.dtype == k.dtype == v.dtype == k_buf.dtype == v_buf.dtype
        and q.dim() == k.dim() == v.dim() == 2
        and q.stride(1) == k.stride(1) == v.stride(1) == 1
        and k.shape[1] == v.shape[1] == kvh * d
        and k_buf.stride() == v_buf.stride() and k_buf.stride(3) == 1 and k_buf.stride(2) == d
    )


def rope_store_kv(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    rotary_dim: int, k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor,
) -> torch.Tensor:
    """NeoX rotate-half of q ``[T, H*D]`` and k ``[T, KVH*D]`` at ``positions`` (``cos_sin_cache[pos]``
    is ``cat(cos, sin)``; dims past ``rotary_dim`` are copied), storing rotated k and v at token
    slots ``loc`` of one layer's pool views ``k_buf``/``v_buf`` ``[pages, page_size, KVH, D]``.
    Returns the rotated q as a new ``[T, H*D]`` tensor (q, k, v are not modified; rows may be
    strided views of a fused qkv). Check :func:`rope_store_applies` first."""
    _, page_size, kvh, d = k_buf.shape
    t = q.shape[0]
    num_q = q.shape[1] // d
    q_out = torch.empty((t, num_q * d), dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out
    stride_page, stride_tok, _ = kv_strides(k_buf, v_buf)
    half, rest = rotary_dim // 2, d - rotary_dim
    _rope_store_kernel[(t,)](
        positions, q, k, v, cos_sin_cache, q_out, k_buf, v_buf, loc,
        q.stride(0), k.stride(0), v.stride(0), q_out.stride(0), cos_sin_cache.stride(0), stride_page, stride_tok,
        num_q, kvh,
        HEAD_DIM=d, HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=triton.next_power_of_2(num_q),
        BLOCK_HK=triton.next_power_of_2(kvh), PASS=rest, BLOCK_PASS=triton.next_power_of_2(max(rest, 1)),
        BLOCK_D=triton.next_power_of_2(d), PAGE_SIZE=page_size, num_warps=4, **pdl_options(q),
    )
    return q_out
