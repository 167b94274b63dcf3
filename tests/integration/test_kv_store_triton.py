"""The Triton K/V store (``attention.triton.store.store_kv``) against ``KVPool.set_kv``.

Each case builds two identical page-major pools filled with noise, draws scattered distinct slots
(slot 0, the padding page, included when ``T`` allows), and K/V as non-contiguous slices of a
fused qkv output (optionally in another dtype than the pool, so the kernel casts); one pool is
written by ``set_kv``, the other by ``store_kv``; the whole buffers must be equal bit for bit
(every other layer, page and slot untouched).

Devices: ``interpret`` runs the kernel in Triton's CPU interpreter in one worker subprocess (this
file run as a script, JSON lines) because ``TRITON_INTERPRET=1`` must be set before kernels are
decorated; ``cuda`` (marked gpu) runs in-process, plus CUDA-graph capture/replay. The kernel is
also compiled to an sm_90 cubin on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from itertools import product
from typing import Any

import pytest
import torch

from tests.helpers.triton_worker import device_runner, interpreter_fixture, serve

pytestmark = pytest.mark.integration

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- cases (run in either process)


def _twin_pools(
    tokens: int, page_size: int, layers: int, num_kv_heads: int, head_dim: int, dt: torch.dtype,
    dev: torch.device, gen: torch.Generator,
) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
    """Two equal page-major pools full of noise (the noise too), and ``tokens`` distinct random slots
    past the padding slot 0 (CPU)."""
    from sglang.engine.memory import KVPool

    num_pages = max(4, -(-3 * tokens // page_size))
    pools = [KVPool(num_pages, page_size, layers, num_kv_heads, head_dim, dt, dev) for _ in range(2)]
    noise = torch.randn(pools[0].buffer.shape, generator=gen).to(dt)
    for p in pools:
        p.buffer.copy_(noise)
    slots = torch.randperm((num_pages + 1) * page_size - 1, generator=gen)[:tokens] + 1
    return pools, noise, slots


def store_case(
    device: str,
    dtype: str,
    page_size: int,
    tokens: int,
    in_dtype: str | None = None,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    layer: int = 1,
    loc_dtype: str = "int64",
    seed: int = 0,
) -> float:
    """Store ``tokens`` new K/V rows with both paths; returns the number of differing elements."""
    from sglang.engine.attention.triton.store import store_kv

    dev, dt, in_dt = torch.device(device), DTYPES[dtype], DTYPES[in_dtype or dtype]
    gen = torch.Generator().manual_seed(seed)
    pools, noise, slots = _twin_pools(tokens, page_size, 3, num_kv_heads, head_dim, dt, dev, gen)
    if tokens > 1:
        # CUDA-graph padding writes to slot 0. Exactly once here: which of several writes to one
        # slot lands is unspecified (for index_put too), and nothing reads the padding slot.
        slots[tokens // 2] = 0
    loc = slots.to(getattr(torch, loc_dtype)).to(dev)
    kvd = num_kv_heads * head_dim
    qkv = torch.randn(tokens, 3 * kvd + 8, generator=gen).to(in_dt).to(dev)
    q, k, v, _ = qkv.split([kvd, kvd, kvd, 8], dim=1)  # row stride 3*kvd+8: not contiguous
    assert tokens == 1 or not (k.is_contiguous() or v.is_contiguous())
    before = qkv.clone()
    pools[0].set_kv(layer, loc, k.reshape(tokens, num_kv_heads, head_dim), v.reshape(tokens, num_kv_heads, head_dim))
    k_buf, v_buf = pools[1].get_kv(layer)
    store_kv(k_buf, v_buf, loc, k, v)
    assert torch.equal(qkv, before)  # inputs untouched
    ref, got = pools[0].buffer, pools[1].buffer
    assert not torch.equal(ref, noise.to(dev)) or tokens == 0
    return float((ref != got).sum())


def rope_store_case(
    device: str, dtype: str, page_size: int, tokens: int, num_heads: int = 8, num_kv_heads: int = 2,
    head_dim: int = 64, rotary_dim: int | None = None, seed: int = 0,
) -> float:
    """``rope_store_kv`` against the rotary kernel followed by ``store_kv`` (the unfused path) on
    strided slices of one fused qkv output: the rotated q and the whole pools must be equal bit for
    bit and the inputs untouched. Returns the number of differing elements."""
    from sglang.engine.attention.triton.store import rope_store_applies, rope_store_kv, store_kv
    from sglang.engine.layers.fused.triton_ops import apply_rotary

    dev, dt = torch.device(device), DTYPES[dtype]
    rdim = rotary_dim or head_dim
    gen = torch.Generator().manual_seed(seed)
    pools, _, slots = _twin_pools(tokens, page_size, 2, num_kv_heads, head_dim, dt, dev, gen)
    loc = slots.to(dev)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(dev)
    cache = torch.randn(4096, rdim, generator=gen).to(dev)  # cat(cos, sin) rows, float32 as the layer keeps them
    qd, kvd = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(tokens, qd + 2 * kvd + 8, generator=gen).to(dt).to(dev)
    q, k, v, _ = qkv.split([qd, kvd, kvd, 8], dim=1)
    before = qkv.clone()
    q_ref, k_ref = apply_rotary(positions, q, k, cache, head_dim, rdim)
    store_kv(*pools[0].get_kv(1), loc, k_ref, v)
    k_buf, v_buf = pools[1].get_kv(1)
    assert rope_store_applies(q, k, v, k_buf, v_buf)
    q_got = rope_store_kv(positions, q, k, v, cache, rdim, k_buf, v_buf, loc)
    assert torch.equal(qkv, before)
    return float((q_ref != q_got).sum() + (pools[0].buffer != pools[1].buffer).sum())


CASES: dict[str, Callable[..., float]] = {"store_case": store_case, "rope_store_case": rope_store_case}


def _setup_worker() -> None:
    from tests.integration.test_fused_ops import _round_bf16_like_gpu

    _round_bf16_like_gpu()  # fp32 -> bf16 casts round to nearest even, as torch and the GPU do


# ---------------------------------------------------------------- pytest side


interpreter = interpreter_fixture(__file__)
Run = Callable[..., float]


@pytest.fixture
def run(request: pytest.FixtureRequest) -> Run:
    """``run(fn_name, **kwargs)``: in the interpreter worker, or in-process on CUDA."""
    return device_runner(request, CASES)


def _grid() -> list[Any]:
    out = []
    for device, dtype, ps, tokens in product(["interpret", "cuda"], ["float32", "bfloat16"], [1, 16], [1, 37]):
        marks = [pytest.mark.gpu] if device == "cuda" else []
        out.append(pytest.param(device, dtype, ps, tokens, marks=marks, id=f"{device}-{dtype}-ps{ps}-t{tokens}"))
    return out


@pytest.mark.parametrize(("device", "dtype", "page_size", "tokens"), _grid())
def test_store_matches_set_kv(run: Run, device: str, dtype: str, page_size: int, tokens: int) -> None:
    assert run("store_case", dtype=dtype, page_size=page_size, tokens=tokens) == 0


def _odd(device: str, *values: Any) -> Any:
    marks = [pytest.mark.gpu] if device == "cuda" else []
    return pytest.param(device, *values, marks=marks, id="-".join(map(str, (device, *values))))


ODD = [  # (dtype, in_dtype, page_size, tokens, num_kv_heads, head_dim, layer, loc_dtype)
    ("bfloat16", "float32", 16, 37, 2, 64, 0, "int64"),  # cast fp32 -> bf16 in the kernel
    ("float32", "bfloat16", 1, 37, 2, 64, 2, "int32"),  # upcast; int32 slots
    ("float32", None, 3, 37, 3, 80, 1, "int64"),  # odd page size, KVH and head_dim (masked lanes)
    ("bfloat16", None, 16, 1, 8, 128, 2, "int32"),  # Llama-3-8B's KV shape, batch-1 decode
]


@pytest.mark.parametrize(
    ("device", "dtype", "in_dtype", "page_size", "tokens", "num_kv_heads", "head_dim", "layer", "loc_dtype"),
    [_odd(dev, *c) for dev in ("interpret", "cuda") for c in ODD],
)
def test_store_casts_and_odd_shapes(
    run: Run, device: str, dtype: str, in_dtype: str | None, page_size: int, tokens: int,
    num_kv_heads: int, head_dim: int, layer: int, loc_dtype: str,
) -> None:
    assert run("store_case", dtype=dtype, in_dtype=in_dtype, page_size=page_size, tokens=tokens,
               num_kv_heads=num_kv_heads, head_dim=head_dim, layer=layer, loc_dtype=loc_dtype) == 0


ROPE = [  # (dtype, page_size, tokens, num_heads, num_kv_heads, head_dim, rotary_dim)
    ("bfloat16", 16, 37, 8, 2, 64, None),
    ("float32", 1, 37, 8, 2, 64, None),
    ("bfloat16", 3, 5, 6, 3, 80, 48),  # partial rotary: dims 48..79 copied; odd page size and heads
    ("bfloat16", 16, 1, 32, 8, 128, None),  # Llama-3-8B, batch-1 decode
    ("float16", 16, 300, 16, 8, 128, None),  # a prefill chunk
]


@pytest.mark.parametrize(
    ("device", "dtype", "page_size", "tokens", "num_heads", "num_kv_heads", "head_dim", "rotary_dim"),
    [_odd(dev, *c) for dev in ("interpret", "cuda") for c in ROPE],
)
def test_rope_store_matches_rotary_then_store(
    run: Run, device: str, dtype: str, page_size: int, tokens: int, num_heads: int, num_kv_heads: int,
    head_dim: int, rotary_dim: int | None,
) -> None:
    assert run("rope_store_case", dtype=dtype, page_size=page_size, tokens=tokens, num_heads=num_heads,
               num_kv_heads=num_kv_heads, head_dim=head_dim, rotary_dim=rotary_dim) == 0


def test_rope_store_refuses_what_it_cannot_take() -> None:
    """Mixed dtypes, a pool in another dtype, or heads that are not contiguous keep the unfused path."""
    from sglang.engine.attention.triton.store import rope_store_applies
    from sglang.engine.memory import KVPool

    pool = KVPool(4, 16, 1, 2, 64, torch.bfloat16, torch.device("cpu"))
    k_buf, v_buf = pool.get_kv(0)
    q, k, v = (torch.zeros(3, n, dtype=torch.bfloat16) for n in (256, 128, 128))
    assert rope_store_applies(q, k, v, k_buf, v_buf)
    assert not rope_store_applies(q.float(), k, v, k_buf, v_buf)
    assert not rope_store_applies(q, k, v.half(), k_buf, v_buf)
    f32 = KVPool(4, 16, 1, 2, 64, torch.float32, torch.device("cpu"))
    assert not rope_store_applies(q, k, v, *f32.get_kv(0))
    assert not rope_store_applies(q, k.t().contiguous().t(), v, k_buf, v_buf)  # column-major rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("tokens", [1, 37, 4096])
@pytest.mark.gpu
def test_store_large_cuda(dtype: str, tokens: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    assert store_case("cuda", dtype, 16, tokens, num_kv_heads=8, head_dim=128) == 0


@pytest.mark.gpu
def test_store_cuda_graph_replay() -> None:
    """Captured once, replayed with new slots and K/V copied into the static inputs: equals set_kv."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    from sglang.engine.attention.triton.store import store_kv
    from sglang.engine.memory import KVPool

    dev, t, kvh, d = torch.device("cuda"), 8, 8, 128
    pool = KVPool(64, 16, 2, kvh, d, torch.bfloat16, dev)
    ref = KVPool(64, 16, 2, kvh, d, torch.bfloat16, dev)
    loc = torch.zeros(t, dtype=torch.int64, device=dev)
    qkv = torch.zeros(t, 3 * kvh * d, dtype=torch.bfloat16, device=dev)
    _, k, v = qkv.split([kvh * d] * 3, dim=1)
    k_buf, v_buf = pool.get_kv(1)
    store_kv(k_buf, v_buf, loc, k, v)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_kv(k_buf, v_buf, loc, k, v)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        loc.copy_(torch.randperm(65 * 16, generator=gen)[:t])
        qkv.copy_(torch.randn(qkv.shape, generator=gen).to(torch.bfloat16))
        graph.replay()
        ref.set_kv(1, loc, k.reshape(t, kvh, d), v.reshape(t, kvh, d))
        torch.cuda.synchronize()
        assert torch.equal(pool.buffer, ref.buffer)


def _compile_sm90(kernel: Any, consts: dict[str, int], ptrs: dict[str, str], default_ptr: str) -> bytes:
    """``kernel`` compiled to an H100 cubin without a GPU: pointer arguments (names ending in
    ``_ptr``/``_out``/``_buf``) typed by ``ptrs`` or ``default_ptr``, ``stride_page`` int64, other scalars int32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    sig = {n: "constexpr" if n in consts else f"*{ptrs.get(n, default_ptr)}" if n.endswith(("_ptr", "_out", "_buf"))
           else "i64" if n == "stride_page" else "i32" for n in kernel.arg_names}
    opts = backend.parse_options({"num_warps": 4})
    return bytes(triton.compile(ASTSource(kernel, sig, consts), target=target, options=opts.__dict__).asm["cubin"])


def _compiles_here() -> Any:
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("kernels are interpreted in this process")
    return triton


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_store_kernel_compiles_for_sm90(dtype: str) -> None:
    """Compile the GPU path to an H100 cubin without a GPU (what only the compiler checks)."""
    triton = _compiles_here()
    from sglang.engine.attention.triton import store

    for pool_dt, loc_dt, (kvh, d, ps) in product(["bf16", dtype], ["i64", "i32"], [(8, 128, 16), (3, 80, 1)]):
        consts = {"NUM_KV_HEADS": kvh, "HEAD_DIM": d, "BLOCK_H": triton.next_power_of_2(kvh),
                  "BLOCK_D": triton.next_power_of_2(d), "PAGE_SIZE": ps, "PDL": loc_dt == "i64"}
        cubin = _compile_sm90(store._store_kv_kernel, consts, {"k_buf": pool_dt, "v_buf": pool_dt, "loc_ptr": loc_dt}, dtype)
        assert len(cubin) > 0, (pool_dt, loc_dt, kvh, d, ps)


def test_rope_store_kernel_compiles_for_sm90() -> None:
    """The fused rotary + store kernel compiles to an H100 cubin without a GPU (Llama and a partial rotary)."""
    triton = _compiles_here()
    from sglang.engine.attention.triton import store

    for dt, (h, kvh, d, rdim, ps) in product(["bf16", "fp32"], [(32, 8, 128, 128, 16), (6, 3, 80, 48, 1)]):
        half, rest = rdim // 2, d - rdim
        consts = {"HEAD_DIM": d, "HALF": half, "BLOCK_HALF": triton.next_power_of_2(half),
                  "BLOCK_HQ": triton.next_power_of_2(h), "BLOCK_HK": triton.next_power_of_2(kvh), "PASS": rest,
                  "BLOCK_PASS": triton.next_power_of_2(max(rest, 1)), "BLOCK_D": triton.next_power_of_2(d),
                  "PAGE_SIZE": ps}
        cubin = _compile_sm90(store._rope_store_kernel, consts, {"pos_ptr": "i64", "cache_ptr": "fp32", "loc_ptr": "i64"}, dt)
        assert len(cubin) > 0, (dt, h, kvh, d, rdim, ps)


if __name__ == "__main__":
    serve(CASES, _setup_worker)
