"""Extend (prefill) attention over a ragged batch: request ``i`` computes ``extend_lens[i]`` new
tokens on top of ``prefix_lens[i]`` tokens already in the paged KV pool.

The backend writes the new tokens' K/V to the pool first, so every key (prefix or new) is read
the same way: by slot through the request-to-token table. Work is cut into tiles of one request's
consecutive new tokens; a program handles one (tile, KV head) and puts the tile's tokens times the
GQA group's q heads on the rows of one block (row ``r`` = token ``r // GROUP``, head ``r % GROUP``),
so each K/V tile feeds the whole group. Causal (and sliding-window) masking is per row. Tiles are
built on the host from the batch's length lists; extend batches are not graph-captured.
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
from sglang.utils.tensors import to_device

BLOCK_ROWS = 64  # query rows (tokens x group heads) per program
BLOCK_N = 64  # keys per step


@triton.jit
def _extend_kernel(
    q_ptr, k_buf, v_buf, table_ptr, tiles_ptr, out_ptr,
    stride_qt, stride_qh, stride_page, stride_tok, stride_kvh, stride_table, stride_ot, stride_oh,
    qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_FP32: tl.constexpr, INTERP: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(tiles_ptr + tile * 4).to(tl.int64)
    tok0 = tl.load(tiles_ptr + tile * 4 + 1)  # packed index of the tile's first token
    pos0 = tl.load(tiles_ptr + tile * 4 + 2)  # its position in the request
    ntok = tl.load(tiles_ptr + tile * 4 + 3)

    offs_r = tl.arange(0, BLOCK_R)
    tok = offs_r // GROUP
    r_mask = tok < ntok
    heads = kvh * GROUP + offs_r % GROUP
    q_pos = pos0 + tok
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + (tok0 + tok).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=r_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    k_base = k_buf + kvh.to(tl.int64) * stride_kvh
    v_base = v_buf + kvh.to(tl.int64) * stride_kvh
    hi = pos0 + ntok  # keys past the tile's last token are never seen
    lo = tl.maximum(pos0 - window + 1, 0)  # nor keys before its first token's window
    vis_lo = tl.maximum(lo, hi - window)  # keys every row of the tile sees: [vis_lo, pos0 + 1)
    _, l_i, acc = attend_range(
        q, q_pos, r_mask, lo, hi, vis_lo, pos0 + 1, window, table_ptr + row * stride_table, k_base, v_base, stride_page,
        stride_tok, offs_d, d_mask, qk_scale, BLOCK_R, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_FP32, INTERP,
    )

    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(
        out_ptr + (tok0 + tok).to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :],
    )


def extend_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Launch parameters of the extend kernel for ``dtype`` queries on ``device`` (keyword arguments
    of :func:`extend_attention`). float32 keeps 64-row tiles: its operands are twice as large."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        # benchmarks/attention_kernels.py --sweep-extend, H100: 1.14-1.25x over 64/64/4/2
        return {"block_rows_": 128, "block_n": 32, "num_warps": 4, "num_stages": 3}
    return {"block_rows_": BLOCK_ROWS, "block_n": BLOCK_N, "num_warps": 4, "num_stages": 2}


def tokens_per_tile(group: int, rows: int = BLOCK_ROWS) -> int:
    """New tokens one extend program covers for a GQA group of ``group`` q heads."""
    return max(1, block_rows(group, rows) // group)


def block_rows(group: int, rows: int = BLOCK_ROWS) -> int:
    return max(rows, triton.next_power_of_2(group))


def extend_tiles(
    req_rows: list[int], prefix_lens: list[int], extend_lens: list[int], group: int, device: torch.device,
    rows: int = BLOCK_ROWS,
) -> torch.Tensor:
    """``[tiles, 4]`` int32 (table row, packed index of first token, its position, tokens), the
    tiles with the most keys first; ``rows`` must be the ``block_rows`` later passed to
    :func:`extend_attention`."""
    per = tokens_per_tile(group, rows)
    tiles: list[list[int]] = []
    tok0 = 0
    for row, pre, ext in zip(req_rows, prefix_lens, extend_lens, strict=True):
        for s in range(0, ext, per):
            tiles.append([row, tok0 + s, pre + s, min(per, ext - s)])
        tok0 += ext
    # Heaviest first (a tile's keys end at its last token): the causal tail tiles no longer start
    # last and run alone (8 x 1024 on an H100: 324 -> 300 us; 1 x 4096: 587 -> 562 us).
    tiles.sort(key=lambda t: t[2] + t[3], reverse=True)
    return to_device(tiles, torch.int32, device).reshape(-1, 4)  # pinned, non-blocking: no wait on the GPU


def extend_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    table: torch.Tensor,
    tiles: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    block_rows_: int = BLOCK_ROWS,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Causal attention of packed new tokens ``q`` ``[T, H, D]`` over prefix + new keys.

    ``tiles`` comes from :func:`extend_tiles` with this layer's group (``H // KVH``) and the same
    ``block_rows_`` (query rows per program; ``block_n``: keys per step); the new
    tokens' K/V must already be in ``k_buf``/``v_buf`` (one layer's ``[pages, page_size, KVH, D]``
    views, ``KVPool.get_kv``) at the slots the table names. Returns
    ``[T, H, D]`` in q's dtype.
    """
    t, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_buf.shape[1], k_buf.shape[2]
    stride_page, stride_tok, stride_kvh = kv_strides(k_buf, v_buf)
    group = num_heads // num_kv_heads
    out = torch.empty((t, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if tiles.shape[0] == 0:
        return out
    _extend_kernel[(tiles.shape[0], num_kv_heads)](
        q, k_buf, v_buf, table, tiles, out,
        q.stride(0), q.stride(1), stride_page, stride_tok, stride_kvh,
        table.stride(0), out.stride(0), out.stride(1),
        scaling * LOG2E, sliding_window or NO_WINDOW,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_R=block_rows(group, block_rows_), BLOCK_D=block_d(head_dim),
        BLOCK_N=block_n, PAGE_SIZE=page_size, DOT_FP32=dot_in_fp32(q.dtype), INTERP=interpreting(),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
