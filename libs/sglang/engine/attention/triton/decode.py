"""Split-K decode attention: one new query token per request over its paged KV.

Stage 1 runs one program per (KV head, request, split). The program loads the query of every q
head that shares that KV head (GQA group, padded to ``BLOCK_H`` rows) so each K/V tile is read
once for the whole group, walks its share of the request's context gathering K/V by slot through
the request-to-token table, and writes the split's normalised partial output and its
log-sum-exp (base 2). Stage 2 runs one program per (request, q head) and merges the splits.

Split ranges are computed inside the kernel from ``seq_lens``, so the grid depends only on the
batch size and ``num_splits``: the launch is CUDA-graph capturable with static input tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.engine.attention.triton.common import (
    LOG2E,
    NO_WINDOW,
    attend_range,
    block_d,
    dot_in_fp32,
    interpreting,
    kv_strides,
)
from sglang.engine.attention.triton.pdl import pdl_enter, pdl_options


@triton.jit
def _decode_split_kernel(
    q_ptr, k_buf, v_buf, table_ptr, rows_ptr, seq_lens_ptr, mid_o, mid_lse,
    stride_qt, stride_qh, stride_page, stride_tok, stride_kvh, stride_table,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
    qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_FP32: tl.constexpr,
    INTERP: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    # KV head fastest: one request's heads run side by side and read adjacent bytes of each page
    # (batch 256, context 1152 on an H100: 0.953 -> 0.975 of the copy bandwidth).
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    row = tl.load(rows_ptr + b).to(tl.int64)
    kv_lo = tl.maximum(seq_len - window, 0)  # the query sits at seq_len - 1 and sees `window` tokens
    per_split = tl.cdiv(tl.cdiv(seq_len - kv_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = kv_lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    k_base = k_buf + kvh.to(tl.int64) * stride_kvh
    v_base = v_buf + kvh.to(tl.int64) * stride_kvh
    q_pos = tl.zeros([BLOCK_H], tl.int32) + seq_len - 1
    m_i, l_i, acc = attend_range(
        q, q_pos, h_mask, start, end, start, end, window, table_ptr + row * stride_table, k_base, v_base, stride_page,
        stride_tok, offs_d, d_mask, qk_scale, BLOCK_H, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_FP32, INTERP, False,
    )

    l_safe = tl.maximum(l_i, 1e-30)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))  # empty split -> -inf, weight 0
    out = acc / l_safe[:, None]
    o_off = b.to(tl.int64) * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
    # DIRECT (one split): ``mid_o`` is the output itself, in q's dtype; nothing to merge.
    tl.store(mid_o + o_off, out.to(mid_o.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    if not DIRECT:
        tl.store(mid_lse + b.to(tl.int64) * stride_mlb + heads * stride_mlh + split, lse, mask=h_mask)


@triton.jit
def _decode_merge_kernel(
    mid_o, mid_lse, out_ptr,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(mid_lse + b * stride_mlb + h * stride_mlh + offs_s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # only for padded requests with seq_len 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    denom = tl.where(denom == 0, 1.0, denom)
    o = tl.load(
        mid_o + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
        mask=d_mask[None, :], other=0.0,
    )
    out = tl.sum(o * w[:, None], 0) / denom
    tl.store(out_ptr + b * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


DEFAULT_MAX_KV_SPLITS = 32  # the fastest at batch 1 in benchmarks/attention_kernels.py --sweep (H100)


def device_caps(device: torch.device) -> tuple[int, bool]:
    """``(SM count, >= 160 KiB of shared memory per block)`` of ``device``, the two facts the
    decode launch depends on (the interpreter: a small GPU's worth of programs, small memory)."""
    if device.type != "cuda":
        return 4, False
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 0) >= 160 * 1024


def decode_launch(splits: int, big_smem: bool) -> dict[str, int]:
    """Launch parameters of the decode kernel for ``splits`` KV splits (``big_smem``: >= 160 KiB
    of shared memory per block). Whole contexts per program (one split, large batches) stream
    128-token tiles (H100: 0.95-0.99 of the copy bandwidth at batch 256 vs 0.75-0.79 with 64-token
    tiles). Split contexts (small batches, latency-bound): 32-token tiles, 3 stages (batch 8 on
    H100: 27.2 vs 30.0 us at context 1024, 70.8 vs 76.0 at 4096, against 64-token tiles); at the
    most splits (batch 1) 128-token tiles and 8 warps (16.0 vs 46.6 us at 1024, 55.9 vs 63.6 at 4096).
    ``benchmarks/attention_kernels.py --sweep [--quick]`` measures the choices."""
    if splits == 1:
        return {"block_n": 128 if big_smem else 64, "num_warps": 4, "num_stages": 2}
    if splits >= DEFAULT_MAX_KV_SPLITS:
        return {"block_n": 128 if big_smem else 64, "num_warps": 8, "num_stages": 2}
    return {"block_n": 32, "num_warps": 4, "num_stages": 3}


def pick_num_splits(bs: int, num_kv_heads: int, max_splits: int, sm_count: int) -> int:
    """KV splits per (request, KV head) for a decode batch of ``bs``: the largest power of two up
    to ``max_splits`` that keeps ``bs * num_kv_heads * splits`` within ``8 * sm_count`` programs
    (at least 1). Small batches spread each context over many programs (batch 1 on an H100 with
    ``DEFAULT_MAX_KV_SPLITS``: 256 programs); large batches have enough (request, head) pairs and stream whole
    contexts, which saves the partial outputs' traffic. Depends only on the batch size, so a
    CUDA graph per batch size stays valid."""
    target = 8 * sm_count
    splits = 1
    while splits * 2 <= max_splits and bs * num_kv_heads * splits * 2 <= target:
        splits *= 2
    return splits


def scratch_rows(max_bs: int, max_splits: int, sm_count: int, fixed: bool) -> int:
    """(request, split) rows of scratch that cover every batch up to ``max_bs``: with
    :func:`pick_num_splits`, ``bs * splits`` is at most ``max(max_bs, 8 * sm_count)``."""
    return max_bs * max_splits if fixed else max(max_bs, min(8 * sm_count, max_bs * max_splits))


def decode_scratch(rows: int, num_heads: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K scratch for ``rows`` (request, split) pairs: partial outputs and their base-2 LSEs,
    flat; :func:`decode_attention` views the first ``bs * splits`` rows."""
    mid_o = torch.empty(rows * num_heads * head_dim, dtype=torch.float32, device=device)
    mid_lse = torch.empty(rows * num_heads, dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    table: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scratch: tuple[torch.Tensor, torch.Tensor],
    scaling: float,
    sliding_window: int | None = None,
    num_splits: int = 16,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of ``q`` ``[B, H, D]`` (one token per request) over each request's context.

    ``k_buf``/``v_buf`` are one layer's views ``[pages, page_size, KVH, D]`` of the page-major
    pool (``KVPool.get_kv``; slot ``s`` is ``[s // page_size, s % page_size]``); request ``i`` owns
    row ``req_pool_indices[i]`` of ``table`` and its first ``seq_lens[i]`` entries (the new token's
    K/V already written). ``num_splits`` (a power of two) programs share each (request, KV head);
    ``scratch`` (see :func:`decode_scratch`) must hold ``B * num_splits`` rows; with one split the
    first kernel writes the output directly (no scratch, no merge). Returns
    ``[B, H, D]`` in q's dtype. Issues no host synchronisation.
    """
    bs, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_buf.shape[1], k_buf.shape[2]
    stride_page, stride_tok, stride_kvh = kv_strides(k_buf, v_buf)
    group = num_heads // num_kv_heads
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    out = torch.empty((bs, num_heads, head_dim), dtype=q.dtype, device=q.device)
    direct = num_splits == 1
    if direct:
        mid_o, mid_lse = out.view(bs, num_heads, 1, head_dim), scratch[1]
        mo_strides = (out.stride(0), out.stride(1), 0)
        ml_strides = (0, 0)
    else:
        rows = bs * num_splits
        if scratch[1].numel() < rows * num_heads:
            raise ValueError(
                f"decode scratch holds {scratch[1].numel() // num_heads} rows, batch {bs} x {num_splits} splits needs {rows}"
            )
        mid_o = scratch[0][: rows * num_heads * head_dim].view(bs, num_heads, num_splits, head_dim)
        mid_lse = scratch[1][: rows * num_heads].view(bs, num_heads, num_splits)
        mo_strides = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2))
        ml_strides = (mid_lse.stride(0), mid_lse.stride(1))
    bd = block_d(head_dim)
    _decode_split_kernel[(num_kv_heads, bs, num_splits)](
        q, k_buf, v_buf, table, req_pool_indices, seq_lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), stride_page, stride_tok, stride_kvh,
        table.stride(0), *mo_strides, *ml_strides,
        scaling * LOG2E, sliding_window or NO_WINDOW,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=bd,
        BLOCK_N=block_n, PAGE_SIZE=page_size, NUM_SPLITS=num_splits, DOT_FP32=dot_in_fp32(q.dtype), INTERP=interpreting(),
        DIRECT=direct, num_warps=num_warps, num_stages=num_stages, **pdl_options(q),
    )
    if not direct:
        _decode_merge_kernel[(bs, num_heads)](
            mid_o, mid_lse, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=bd, NUM_SPLITS=num_splits, num_warps=4, **pdl_options(q),
        )
    return out
