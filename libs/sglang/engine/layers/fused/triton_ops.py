"""Triton kernels for RMSNorm (with the fused residual add), NeoX rotary and SiluAndMul.

Each replaces a chain of 4-10 small torch kernels with one launch. They follow the torch layers'
rounding order: wherever the torch code produces an intermediate in the model dtype, the kernel
rounds to that dtype too (``round_to``), so bf16/fp16 results match torch up to the last-ulp effects
of different reduction orders and of approximate ``exp``/``rsqrt``.

Launches depend only on the input shapes and allocate their outputs with ``torch.empty``: no host
syncs, so they are CUDA-graph capturable. Inputs need a unit stride in the last dim (rows may be
strided, e.g. q and k as slices of a fused qkv); other inputs are made contiguous first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.engine.attention.triton.common import rotate_heads, rotate_q_heads, round_to
from sglang.engine.attention.triton.pdl import pdl_enter, pdl_options

_SILU_BLOCK = 1024


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    stride_x, stride_res, stride_out, stride_sum,
    n, eps, n_rows, inner, stride_inner,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr = False,
):
    """``ROWS`` rows per program. Row ``r`` of x starts at ``(r // inner) * stride_x + (r % inner) *
    stride_inner`` (a ``[t, heads, head_dim]`` view of a fused qkv output without a copy; ``inner``
    is 1 for a plain 2-D input); the other tensors are 2-D with unit inner stride."""
    pdl_enter(PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (offs < n)[None, :]
    dtype = x_ptr.dtype.element_ty
    x_off = (rows // inner) * stride_x + (rows % inner) * stride_inner
    x = tl.load(x_ptr + x_off[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + r, dtype)  # the residual add happens in the input dtype
        tl.store(sum_ptr + rows[:, None] * stride_sum + offs[None, :], x.to(sum_ptr.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, axis=1) / n
    normed = round_to(x * tl.math.rsqrt(var + eps)[:, None], dtype)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    out = (w[None, :] * normed).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out + offs[None, :], out, mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, q_out, k_out,
    stride_q, stride_k, stride_qo, stride_ko, stride_cache,
    num_q_heads, num_kv_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, PASS: tl.constexpr, BLOCK_PASS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One token per program, all of its q and k heads (cos/sin loaded once)."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin, offs, mask = rotate_q_heads(t, pos_ptr, cache_ptr, stride_cache, q_ptr, q_out, stride_q, stride_qo,
                                          num_q_heads, HEAD_DIM, HALF, BLOCK_HALF, BLOCK_HQ, PASS, BLOCK_PASS)
    rotate_heads(k_ptr + t * stride_k, k_out + t * stride_ko, num_kv_heads, cos, sin, offs, mask,
                  HEAD_DIM, HALF, BLOCK_HK, PASS, BLOCK_PASS)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = round_to(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(dtype), mask=mask)


@triton.jit(do_not_specialize=["seed"])  # a new seed every step: never a new compilation
def _sample_kernel(
    logits_ptr, inv_temp_ptr, key_ptr, idx_ptr, stride, seed,
    V: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program ``(row, part)``: over columns ``part * CHUNK ..``, the best ``logit_i * inv_temp +
    g_i`` with ``g_i = -log(-log(u_i))``, ``u_i`` uniform, and its column (the smallest among
    ties). The argmax over all parts is a Gumbel-max draw from ``softmax(logits * inv_temp)``;
    -inf logits (masked tokens) never win.

    The uniforms come from philox (``seed``) four at a time: counter ``(row * blocks + block) *
    BLOCK / 4 + i`` gives the columns ``block * BLOCK + j * BLOCK / 4 + i`` (j = 0..3), so the draw
    depends on ``BLOCK`` but not on ``SPLITS``. One philox call per column cost 4x the integer
    work (batch 256 x 128k vocabulary on an H100: 184 -> 130 us)."""
    pdl_enter(PDL)
    row = tl.program_id(0)
    part = tl.program_id(1)
    QUARTER: tl.constexpr = BLOCK // 4
    BLOCKS: tl.constexpr = (V + BLOCK - 1) // BLOCK
    LN2: tl.constexpr = 0.6931471805599453
    LOG2_LN2: tl.constexpr = -0.5287663729448977
    inv_t = tl.load(inv_temp_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_i = tl.full([QUARTER], V, tl.int32)
    for start in range(0, CHUNK, BLOCK):
        c0 = part * CHUNK + start
        ctr = (row * BLOCKS + c0 // BLOCK) * QUARTER + tl.arange(0, QUARTER)
        r0, r1, r2, r3 = tl.randint4x(seed, ctr)
        for j in tl.static_range(4):
            r = r0 if j == 0 else (r1 if j == 1 else (r2 if j == 2 else r3))
            cols = c0 + j * QUARTER + tl.arange(0, QUARTER)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
            # -log(-log u) in base 2: u = 0 gives -inf (never wins)
            g = -LN2 * (tl.log2(-tl.log2(tl.random.uint_to_uniform_float(r))) + LOG2_LN2)
            key = tl.where(mask, x * inv_t + g, float("-inf"))
            take = (key > best) | ((key == best) & (cols < best_i) & mask)
            best = tl.where(take, key, best)
            best_i = tl.where(take, cols, best_i)
    top = tl.max(best, 0)
    idx = tl.min(tl.where(best == top, best_i, V), 0)
    tl.store(key_ptr + row * SPLITS + part, top)
    tl.store(idx_ptr + row * SPLITS + part, idx)


@triton.jit
def _sample_pick_kernel(key_ptr, idx_ptr, out_ptr, V: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr = False):
    """Per row: the column of the best key over the parts (the smallest column among ties)."""
    pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, SPLITS)
    keys = tl.load(key_ptr + row * SPLITS + offs)
    idxs = tl.load(idx_ptr + row * SPLITS + offs)
    top = tl.max(keys, 0)
    idx = tl.min(tl.where(keys == top, idxs, V), 0)
    tl.store(out_ptr + row, tl.minimum(idx, V - 1).to(tl.int64))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D ``[rows, last]`` view (copied only when it cannot be viewed with unit inner stride)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_warps(block: int) -> int:
    return min(max(block // 512, 1), 16)


def _norm_rows(block: int) -> int:
    """Rows per program: short rows (per-head q/k norms, 64-256 wide) share a program."""
    return max(1, min(16, 2048 // block))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dim, as ``RMSNorm.forward``.

    A 3-D ``[t, heads, head_dim]`` view with unit inner stride (Qwen3's q/k heads, sliced from the
    fused qkv output) is read in place; the output is contiguous."""
    n = x.shape[-1]
    inner, stride_inner = 1, 0
    if x.dim() == 3 and x.stride(-1) == 1:
        x2, inner, stride_inner = x, x.shape[1], x.stride(1)
        rows, stride_x = x.shape[0] * x.shape[1], x.stride(0)
    else:
        x2 = _rows(x)
        rows, stride_x = x2.shape[0], x2.stride(0)
    out = torch.empty((rows, n), dtype=torch.result_type(weight, x), device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        per = _norm_rows(block)
        _rmsnorm_kernel[(triton.cdiv(rows, per),)](
            x2, x2, weight, out, out, stride_x, 0, out.stride(0), 0, n, eps, rows, inner, stride_inner,
            HAS_RESIDUAL=False, BLOCK=block, ROWS=per, num_warps=_norm_warps(block), **pdl_options(x),
        )
    return out.view(x.shape)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``summed = x + residual`` (in x's dtype), then ``(rmsnorm(summed), summed)``, as ``RMSNorm.add_norm``.

    ``x`` and ``residual`` must have the same dtype and shape; both outputs are new tensors."""
    n = x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    summed = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        per = _norm_rows(block)
        _rmsnorm_kernel[(triton.cdiv(x2.shape[0], per),)](
            x2, r2, weight, out, summed, x2.stride(0), r2.stride(0), out.stride(0), summed.stride(0), n, eps,
            x2.shape[0], 1, 0, HAS_RESIDUAL=True, BLOCK=block, ROWS=per, num_warps=_norm_warps(block), **pdl_options(x),
        )
    return out.view(x.shape), summed.view(x.shape)


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotate-half of q ``[T, H*D]`` and k ``[T, KVH*D]`` in one launch, as ``RotaryEmbedding``.

    ``cos_sin_cache[pos]`` is ``cat(cos, sin)`` (``rotary_dim/2`` each); dims past ``rotary_dim``
    are copied. Returns new contiguous ``[T, H*D]`` and ``[T, KVH*D]`` tensors in q's dtype; q and
    k are not modified (they may be strided row views of a fused qkv)."""
    t = q.shape[0]
    q2, k2 = _rows(q.reshape(t, -1)), _rows(k.reshape(t, -1))
    num_q, num_kv = q2.shape[1] // head_dim, k2.shape[1] // head_dim
    q_out = torch.empty((t, num_q * head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, num_kv * head_dim), dtype=k.dtype, device=k.device)
    if t:
        half, rest = rotary_dim // 2, head_dim - rotary_dim
        _rotary_kernel[(t,)](
            positions, q2, k2, cos_sin_cache, q_out, k_out,
            q2.stride(0), k2.stride(0), q_out.stride(0), k_out.stride(0), cos_sin_cache.stride(0), num_q, num_kv,
            HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_HQ=triton.next_power_of_2(num_q), BLOCK_HK=triton.next_power_of_2(num_kv),
            PASS=rest, BLOCK_PASS=triton.next_power_of_2(max(rest, 1)), num_warps=4, **pdl_options(q),
        )
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x = [gate | up]`` (last dim ``2n``) -> ``silu(gate) * up`` (last dim ``n``), as ``SiluAndMul``."""
    n = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] and n:
        block = min(_SILU_BLOCK, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
            x2, out, x2.stride(0), out.stride(0), n, BLOCK=block, num_warps=4, **pdl_options(x),
        )
    return out.view(*x.shape[:-1], n)


SAMPLE_BLOCK = 4096  # H100, 128k vocabulary: 12-13 us at batch 1-8 (2048: 16 us), equal at 64-256


def sample_splits(vocab: int, block: int) -> int:
    """Parts per row: 16 (fewer for a small vocabulary, each at least one block; a power of two).
    It depends on the vocabulary only, so one compiled kernel serves every batch size (a part
    count per batch size compiled a new kernel whenever the running batch changed size). Only the
    parallelism depends on it, never the draw."""
    return max(1, min(16, triton.next_power_of_2(triton.cdiv(vocab, block))))


def sample_with_temperature(
    logits: torch.Tensor, inv_temperatures: torch.Tensor, seed: int, block: int = SAMPLE_BLOCK,
    splits: int | None = None,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` drawn from ``softmax(logits * inv_temperatures[b])``
    in one pass over the logits (``_sample_kernel`` over ``splits`` parts of each row, then
    ``_sample_pick_kernel``); int64 ``[B]``. ``seed`` picks the random stream (draw a new one per
    call); the draw does not depend on ``splits``. Needs ``B * V < 2**31`` (int32 philox offsets)."""
    b, v = logits.shape
    if b * v >= 2**31:
        raise ValueError(f"batch {b} x vocabulary {v} is too large for one sampling launch")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    inv = inv_temperatures.reshape(b).to(torch.float32).contiguous()
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b:
        parts = splits or sample_splits(v, block)
        chunk = triton.cdiv(triton.cdiv(v, parts), block) * block  # columns per part, whole blocks
        keys = torch.empty((b, parts), dtype=torch.float32, device=logits.device)
        idxs = torch.empty((b, parts), dtype=torch.int32, device=logits.device)
        _sample_kernel[(b, parts)](
            logits, inv, keys, idxs, logits.stride(0), seed, V=v, CHUNK=chunk, SPLITS=parts, BLOCK=block,
            num_warps=8, **pdl_options(logits),
        )
        _sample_pick_kernel[(b,)](keys, idxs, out, V=v, SPLITS=parts, num_warps=1, **pdl_options(logits))
    return out
