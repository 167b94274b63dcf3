"""Helpers shared by the Triton decode and extend kernels' launchers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # the window kernels use for full attention
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima (exp2 of empty rows gives 0, not NaN)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Kernels then take a ``while`` loop instead of ``for ... in range(lo, hi)`` over loaded bounds:
    the interpreter's scalars are 1-element arrays, which numpy >= 2.4 refuses to ``__index__``.
    On the GPU the ``for`` form is kept because only it is software-pipelined."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether the kernels upcast dot operands to float32 and multiply in IEEE precision.

    float32 models need it (TF32 would cost ~1e-3 relative error); the interpreter needs it for
    every dtype because numpy has no bfloat16 matmul.
    """
    return dtype == torch.float32 or interpreting()


def block_d(head_dim: int) -> int:
    """Power-of-two register block for ``head_dim`` (lanes past ``head_dim`` are masked)."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def attend_tile(
    q, m_i, l_i, acc, table_row, offs_n, n_mask, score_mask, k_base, v_base, stride_page, stride_tok,
    offs_d, d_mask, qk_scale, PAGE_SIZE: tl.constexpr, DOT_FP32: tl.constexpr, MASKED: tl.constexpr = True,
):
    """One online-softmax step of query rows ``q`` ``[R, BLOCK_D]`` over the keys at positions
    ``offs_n`` ``[BLOCK_N]``, gathered by slot from ``table_row``. ``n_mask`` says which positions
    exist, ``score_mask`` ``[R, BLOCK_N]`` which (row, key) pairs attend. Scores are in base 2
    (``qk_scale`` includes log2 e); running maxima start finite so fully masked rows stay at 0.
    Slot ``s`` lives at ``(s // PAGE_SIZE) * stride_page + (s % PAGE_SIZE) * stride_tok`` from the
    layer's K (V) base plus the head offset, in the page-major pool (``KVPool.get_kv``).
    ``MASKED=False``: every key of the tile exists and every row sees it (no mask is applied)."""
    if MASKED:
        slots = tl.load(table_row + offs_n, mask=n_mask, other=0).to(tl.int64)
    else:
        slots = tl.load(table_row + offs_n).to(tl.int64)
    tok = (slots // PAGE_SIZE) * stride_page + (slots % PAGE_SIZE) * stride_tok
    if MASKED:
        k = tl.load(k_base + tok[None, :] + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
    else:
        k = tl.load(k_base + tok[None, :] + offs_d[:, None], mask=d_mask[:, None], other=0.0)
    k = k.to(q.dtype)  # [BLOCK_D, BLOCK_N]
    if DOT_FP32:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if MASKED:
        s = tl.where(score_mask, s * qk_scale, float("-inf"))
    else:
        s = s * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_base + tok[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    else:
        v = tl.load(v_base + tok[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _attend_step(
    q, m_i, l_i, acc, n0, hi, q_pos, r_mask, window, table_row, k_base, v_base, stride_page, stride_tok,
    offs_d, d_mask, qk_scale, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    MASKED: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi  # attend_tile reads both masks only when MASKED
    seen = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] > q_pos[:, None] - window)
    score_mask = seen & n_mask[None, :] & r_mask[:, None]
    return attend_tile(
        q, m_i, l_i, acc, table_row, offs_n, n_mask, score_mask,
        k_base, v_base, stride_page, stride_tok, offs_d, d_mask, qk_scale, PAGE_SIZE, DOT_FP32, MASKED,
    )


@triton.jit
def _attend_loop(
    q, m_i, l_i, acc, lo, hi, end, q_pos, r_mask, window, table_row, k_base, v_base, stride_page, stride_tok,
    offs_d, d_mask, qk_scale, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
    INTERP: tl.constexpr, MASKED: tl.constexpr,
):
    """Tiles starting at ``lo, lo + BLOCK_N, ...`` below ``hi``; keys at or past ``end`` do not exist."""
    if INTERP:
        n0 = lo
        while n0 < hi:
            m_i, l_i, acc = _attend_step(
                q, m_i, l_i, acc, n0, end, q_pos, r_mask, window, table_row, k_base, v_base, stride_page,
                stride_tok, offs_d, d_mask, qk_scale, PAGE_SIZE, BLOCK_N, DOT_FP32, MASKED,
            )
            n0 += BLOCK_N
    else:
        for n0 in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_step(
                q, m_i, l_i, acc, n0, end, q_pos, r_mask, window, table_row, k_base, v_base, stride_page,
                stride_tok, offs_d, d_mask, qk_scale, PAGE_SIZE, BLOCK_N, DOT_FP32, MASKED,
            )
    return m_i, l_i, acc


@triton.jit
def attend_range(
    q, q_pos, r_mask, lo, hi, vis_lo, vis_hi, window, table_row, k_base, v_base, stride_page, stride_tok, offs_d,
    d_mask, qk_scale, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DOT_FP32: tl.constexpr, INTERP: tl.constexpr, SKIP_MASKS: tl.constexpr = True,
):
    """Online softmax of query rows ``q`` (at positions ``q_pos``, valid where ``r_mask``) over the
    key positions ``lo .. hi``: causal, and limited to the last ``window`` tokens of each row.
    Every row sees every key in ``vis_lo .. vis_hi``: with ``SKIP_MASKS`` the whole tiles inside
    that range skip the masks (extend, which is compute-bound), the tiles before and after it
    apply them; without it one masked loop covers the range (decode: memory-bound, and a third of
    the code to compile).
    Returns the running max, sum and unnormalised output ``(m [R], l [R], acc [R, BLOCK_D])``."""
    m_i = tl.full([ROWS], NEG, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    if SKIP_MASKS:
        # Tile starts stay on the lo + k * BLOCK_N grid: [lo, a) masked, [a, b) unmasked, [b, hi) masked.
        a = tl.minimum(lo + tl.cdiv(tl.maximum(vis_lo - lo, 0), BLOCK_N) * BLOCK_N, hi)
        b = tl.maximum(a + (tl.maximum(tl.minimum(vis_hi, hi) - a, 0) // BLOCK_N) * BLOCK_N, a)
        m_i, l_i, acc = _attend_loop(
            q, m_i, l_i, acc, lo, a, hi, q_pos, r_mask, window, table_row, k_base, v_base, stride_page, stride_tok,
            offs_d, d_mask, qk_scale, BLOCK_N, PAGE_SIZE, DOT_FP32, INTERP, True,
        )
        m_i, l_i, acc = _attend_loop(
            q, m_i, l_i, acc, a, b, hi, q_pos, r_mask, window, table_row, k_base, v_base, stride_page, stride_tok,
            offs_d, d_mask, qk_scale, BLOCK_N, PAGE_SIZE, DOT_FP32, INTERP, False,
        )
        m_i, l_i, acc = _attend_loop(
            q, m_i, l_i, acc, b, hi, hi, q_pos, r_mask, window, table_row, k_base, v_base, stride_page, stride_tok,
            offs_d, d_mask, qk_scale, BLOCK_N, PAGE_SIZE, DOT_FP32, INTERP, True,
        )
    else:
        m_i, l_i, acc = _attend_loop(
            q, m_i, l_i, acc, lo, hi, hi, q_pos, r_mask, window, table_row, k_base, v_base, stride_page, stride_tok,
            offs_d, d_mask, qk_scale, BLOCK_N, PAGE_SIZE, DOT_FP32, INTERP, True,
        )
    return m_i, l_i, acc


def kv_strides(k_buf: torch.Tensor, v_buf: torch.Tensor) -> tuple[int, int, int]:
    """Element strides ``(page, token, head)`` of a layer's K/V views ``[pages, page_size, KVH, D]``
    (``KVPool.get_kv``); K and V must share them and head_dim must be contiguous."""
    if k_buf.dim() != 4 or k_buf.stride() != v_buf.stride() or k_buf.stride(3) != 1:
        raise ValueError(f"K/V views must be [pages, page_size, KVH, D] with equal strides, got "
                         f"{tuple(k_buf.shape)} {k_buf.stride()} / {v_buf.stride()}")
    return k_buf.stride(0), k_buf.stride(1), k_buf.stride(2)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE -> float32: the rounding torch applies when it stores an intermediate."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def rotate_heads(
    src, dst, num_heads, cos, sin, offs, mask,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, PASS: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Rotate-half of one token's ``num_heads`` heads at ``src`` into ``dst`` (``[BLOCK_H, BLOCK_HALF]`` at once)."""
    dtype = src.dtype.element_ty
    heads = tl.arange(0, BLOCK_H)
    h_mask = heads < num_heads
    m = h_mask[:, None] & mask[None, :]
    src_h = src + heads[:, None] * HEAD_DIM
    dst_h = dst + heads[:, None] * HEAD_DIM
    x1 = tl.load(src_h + offs[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src_h + HALF + offs[None, :], mask=m, other=0.0).to(tl.float32)
    o1 = round_to(x1 * cos[None, :], dtype) - round_to(x2 * sin[None, :], dtype)
    o2 = round_to(x2 * cos[None, :], dtype) + round_to(x1 * sin[None, :], dtype)
    tl.store(dst_h + offs[None, :], o1.to(dtype), mask=m)
    tl.store(dst_h + HALF + offs[None, :], o2.to(dtype), mask=m)
    if PASS > 0:  # dims past rotary_dim are copied unchanged
        offs_p = tl.arange(0, BLOCK_PASS)
        mp = h_mask[:, None] & (offs_p < PASS)[None, :]
        tl.store(dst_h + 2 * HALF + offs_p[None, :], tl.load(src_h + 2 * HALF + offs_p[None, :], mask=mp), mask=mp)


@triton.jit
def rotate_q_heads(
    t, pos_ptr, cache_ptr, stride_cache, q_ptr, q_out, stride_q, stride_qo, num_q_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
    PASS: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Token ``t``'s cos/sin (``cache[pos[t]]`` = ``cat(cos, sin)``, rounded to q's dtype) and its
    q heads rotated into ``q_out``; returns ``(cos, sin, offs, mask)`` for the k heads."""
    dtype = q_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    row = cache_ptr + pos * stride_cache
    cos = round_to(tl.load(row + offs, mask=mask, other=0.0).to(tl.float32), dtype)
    sin = round_to(tl.load(row + HALF + offs, mask=mask, other=0.0).to(tl.float32), dtype)
    rotate_heads(q_ptr + t * stride_q, q_out + t * stride_qo, num_q_heads, cos, sin, offs, mask,
                 HEAD_DIM, HALF, BLOCK_HQ, PASS, BLOCK_PASS)
    return cos, sin, offs, mask
