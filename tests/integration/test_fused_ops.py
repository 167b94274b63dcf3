"""The fused Triton kernels (RMSNorm, add + RMSNorm, rotary, SiluAndMul) against the torch layers.

Each case builds random inputs, runs the layer's torch code (the CPU path, unchanged) as the
reference and the kernel from ``sglang.engine.layers.fused.triton_ops``, and asserts they agree
(``torch.testing.assert_close`` with per-dtype tolerances; the residual sum exactly).

Devices: ``interpret`` runs the kernels in Triton's CPU interpreter in one worker subprocess (this
file run as a script, JSON lines), because ``TRITON_INTERPRET=1`` must be set before the kernels
are decorated; ``cuda`` (marked gpu) runs in-process, plus CUDA-graph replay and a tiny engine's
greedy tokens against HF transformers. The kernels are also compiled to an sm_90 cubin on CPU.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.helpers.triton_worker import device_runner, interpreter_fixture, serve

pytestmark = pytest.mark.integration

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}  # atol and rtol, element by element
MAX_ABS = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.02}  # max |got - ref| (outputs reach ~10)


# ---------------------------------------------------------------- cases (run in either process)


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: str) -> float:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape, got.dtype, ref.dtype)
    torch.testing.assert_close(got.float().cpu(), ref.float().cpu(), atol=TOL[dtype], rtol=TOL[dtype])
    return float((got.float() - ref.float()).abs().max())


def head_norm_case(device: str, dtype: str, tokens: int, heads: int, head_dim: int, seed: int = 0) -> float:
    """``rmsnorm`` of a ``[tokens, heads, head_dim]`` view of q inside a fused qkv output (Qwen3's
    per-head q norm), read in place, against ``RMSNorm``'s torch code."""
    from sglang.engine.layers.fused import triton_ops
    from sglang.engine.layers.norm import RMSNorm

    dt, gen = DTYPES[dtype], torch.Generator().manual_seed(seed)
    norm = RMSNorm(head_dim, eps=1e-6, dtype=dt).to(device)
    norm.weight.copy_((1 + 0.5 * torch.randn(head_dim, generator=gen)).to(dt))
    qkv = (3 * torch.randn(tokens, (heads + 2) * head_dim, generator=gen)).to(dt).to(device)
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)  # a view: rows are not contiguous
    got = triton_ops.rmsnorm(q, norm.weight, norm.eps)
    assert got.shape == q.shape and got.is_contiguous()
    return _close(got, norm._norm(q), dtype)


def norm_case(device: str, dtype: str, rows: int, hidden: int, residual: bool, seed: int = 0) -> float:
    """``rmsnorm`` / ``fused_add_rmsnorm`` against ``RMSNorm``'s torch code; x is a strided row view."""
    from sglang.engine.layers.fused import triton_ops
    from sglang.engine.layers.norm import RMSNorm

    dt, gen = DTYPES[dtype], torch.Generator().manual_seed(seed)
    norm = RMSNorm(hidden, eps=1e-5, dtype=dt).to(device)
    norm.weight.copy_((1 + 0.5 * torch.randn(hidden, generator=gen)).to(dt))
    x = (3 * torch.randn(rows, hidden + 8, generator=gen)).to(dt).to(device)[:, 4 : 4 + hidden]
    if not residual:
        return _close(triton_ops.rmsnorm(x, norm.weight, norm.eps), norm._norm(x), dtype)
    r = torch.randn(rows, hidden, generator=gen).to(dt).to(device)
    got, got_sum = triton_ops.fused_add_rmsnorm(x, r, norm.weight, norm.eps)
    ref_sum = x + r
    assert torch.equal(got_sum, ref_sum)
    return _close(got, norm._norm(ref_sum), dtype)


def rotary_case(
    device: str, dtype: str, tokens: int, heads: int, kv_heads: int, head_dim: int, rotary_dim: int, seed: int = 0
) -> float:
    """``apply_rotary`` against ``RotaryEmbedding``'s torch code, q and k sliced from a fused qkv."""
    from sglang.engine.layers.fused import triton_ops
    from sglang.engine.layers.rotary import RopeConfig, RotaryEmbedding

    dt, gen = DTYPES[dtype], torch.Generator().manual_seed(seed)
    rope = RopeConfig(head_dim=head_dim, rotary_dim=rotary_dim, max_position=4096, theta=500000.0)
    with torch.device(device):
        rot = RotaryEmbedding(rope)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dt).to(device)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    before = qkv.clone()
    got_q, got_k = triton_ops.apply_rotary(positions, q, k, rot.cos_sin_cache, head_dim, rotary_dim)
    assert torch.equal(qkv, before)  # inputs untouched
    cos, sin = rot.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    err_q = _close(got_q, rot._rotate(q, cos, sin), dtype)
    err_k = _close(got_k, rot._rotate(k, cos, sin), dtype)
    if rotary_dim < head_dim:  # the tail is copied bit for bit
        tail = got_k.view(tokens, kv_heads, head_dim)[..., rotary_dim:]
        assert torch.equal(tail, k.reshape(tokens, kv_heads, head_dim)[..., rotary_dim:])
    return max(err_q, err_k)


def silu_case(device: str, dtype: str, rows: int, n: int, seed: int = 0) -> float:
    """``silu_and_mul`` against ``SiluAndMul``'s torch code."""
    import torch.nn.functional as F
    from sglang.engine.layers.fused import triton_ops

    dt, gen = DTYPES[dtype], torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, 2 * n, generator=gen)).to(dt).to(device)
    gate, up = x.chunk(2, dim=-1)
    return _close(triton_ops.silu_and_mul(x), F.silu(gate) * up, dtype)


def sample_case(device: str, vocab: int, rows: int, block: int, seed: int = 0) -> float:
    """``sample_with_temperature`` on ``rows`` copies of one logits row: ten tokens spread over the
    vocabulary (across kernel blocks) carry the mass, the rest are -inf (never drawn) or -1e4. Half
    the rows sample at temperature 0.5, half at 1.5. Returns the largest gap between a token's
    drawn frequency and its softmax probability over both halves."""
    from sglang.engine.layers.fused import triton_ops

    gen = torch.Generator().manual_seed(seed)
    logits = torch.full((vocab,), float("-inf"))
    logits[1::2] = -1e4
    support = torch.linspace(0, vocab - 1, 10).round().long()
    logits[support] = torch.randn(10, generator=gen) * 1.5
    temps = torch.tensor([0.5] * (rows // 2) + [1.5] * (rows - rows // 2))
    batch = logits.repeat(rows, 1).to(device)
    out = triton_ops.sample_with_temperature(batch, (1 / temps).to(device), seed=1234 + seed, block=block).cpu()
    assert out.shape == (rows,) and out.dtype == torch.int64
    for parts in (1, 2):  # whole rows, and rows cut in two parts (the pick kernel merges them)
        again = triton_ops.sample_with_temperature(batch, (1 / temps).to(device), seed=1234 + seed, block=block,
                                                   splits=parts)
        assert torch.equal(again.cpu(), out), f"the draw changed with {parts} part(s) per row"
    assert bool(torch.isin(out, support).all()), f"drew tokens outside the support: {sorted(set(out.tolist()) - set(support.tolist()))[:5]}"
    worst = 0.0
    for half, t in ((out[: rows // 2], 0.5), (out[rows // 2 :], 1.5)):
        freq = torch.bincount(half, minlength=vocab).double() / len(half)
        worst = max(worst, float((freq - torch.softmax(logits.double() / t, -1)).abs().max()))
    return worst


CASES: dict[str, Callable[..., float]] = {
    "norm_case": norm_case, "rotary_case": rotary_case, "silu_case": silu_case, "sample_case": sample_case,
    "head_norm_case": head_norm_case,
}


def _round_bf16_like_gpu() -> None:
    """Triton 3.6's interpreter converts float32 -> bfloat16 by truncation; the GPU (and torch)
    round to nearest even. Patch the interpreter to round, so bf16 cases compare as on the GPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def rounding_cast(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = rounding_cast  # type: ignore[method-assign]


# ---------------------------------------------------------------- pytest side


interpreter = interpreter_fixture(__file__)


Run = Callable[..., float]


@pytest.fixture
def run(request: pytest.FixtureRequest) -> Run:
    """``run(fn_name, **kwargs)`` on the test's device (``device`` parameter)."""
    return device_runner(request, CASES)


def _params(names: str, grid: dict[str, list[tuple[Any, ...]]]) -> Any:
    out = []
    for device, rows in grid.items():
        marks = [pytest.mark.gpu] if device == "cuda" else []
        out += [pytest.param(device, *r, marks=marks, id="-".join(map(str, (device, *r)))) for r in rows]
    return pytest.mark.parametrize(("device", *names.split(",")), out)


_CUDA_DTYPES = ["float32", "bfloat16", "float16"]


@_params("dtype,rows,hidden,residual", {
    "interpret": [("float32", 37, 4096, True), ("bfloat16", 37, 4096, True), ("float32", 1, 576, False),
                  ("bfloat16", 1, 576, True), ("bfloat16", 37, 576, False), ("float32", 37, 128, True)],
    "cuda": [(d, r, h, res) for d in _CUDA_DTYPES for r in (1, 37, 4096) for h in (128, 576, 4096, 8192)
             for res in (False, True)],
})
def test_rmsnorm_matches_torch(run: Run, device: str, dtype: str, rows: int, hidden: int, residual: bool) -> None:
    assert run("norm_case", dtype=dtype, rows=rows, hidden=hidden, residual=residual) <= MAX_ABS[dtype]


@_params("dtype,tokens,heads,head_dim", {
    "interpret": [("float32", 5, 3, 64), ("bfloat16", 37, 2, 128)],
    "cuda": [(d, t, h, hd) for d in _CUDA_DTYPES for t in (1, 37, 4096) for h, hd in [(16, 128), (8, 128), (3, 80)]],
})
def test_head_rmsnorm_reads_strided_heads(run: Run, device: str, dtype: str, tokens: int, heads: int, head_dim: int) -> None:
    assert run("head_norm_case", dtype=dtype, tokens=tokens, heads=heads, head_dim=head_dim) <= MAX_ABS[dtype]


@_params("dtype,tokens,heads,kv_heads,head_dim,rotary_dim", {
    "interpret": [("float32", 1, 4, 2, 64, 64), ("bfloat16", 37, 8, 2, 128, 128), ("float32", 37, 4, 1, 128, 64),
                  ("bfloat16", 1, 3, 1, 80, 48), ("float32", 37, 2, 2, 80, 80)],
    "cuda": [(d, t, h, kvh, hd, rd) for d in _CUDA_DTYPES for t in (1, 37, 4096)
             for h, kvh, hd, rd in [(32, 8, 128, 128), (8, 2, 128, 64), (3, 1, 80, 48), (16, 16, 256, 256)]],
})
def test_rotary_matches_torch(
    run: Run, device: str, dtype: str, tokens: int, heads: int, kv_heads: int, head_dim: int, rotary_dim: int
) -> None:
    err = run("rotary_case", dtype=dtype, tokens=tokens, heads=heads, kv_heads=kv_heads,
              head_dim=head_dim, rotary_dim=rotary_dim)
    assert err <= MAX_ABS[dtype]


@_params("dtype,rows,n", {
    "interpret": [("float32", 1, 576), ("bfloat16", 37, 1536), ("float32", 37, 1408)],
    "cuda": [(d, r, n) for d in _CUDA_DTYPES for r in (1, 37, 4096) for n in (576, 1408, 14336)],
})
def test_silu_and_mul_matches_torch(run: Run, device: str, dtype: str, rows: int, n: int) -> None:
    assert run("silu_case", dtype=dtype, rows=rows, n=n) <= MAX_ABS[dtype]


@_params("vocab,rows,block", {
    "interpret": [(40, 400, 16)],  # ~8 s: the interpreter runs one program per row
    "cuda": [(100, 200_000, 2048), (128256, 16_000, 2048), (151936, 4000, 1024)],  # rows x vocab < 2**31
})
def test_sampling_kernel_draws_from_softmax(run: Run, device: str, vocab: int, rows: int, block: int) -> None:
    """The one-pass Gumbel-max sampler draws each token with its softmax probability at the row's
    temperature (5 standard deviations of the frequency estimate: deterministic seeds, so not flaky)
    and never draws a -inf token."""
    assert run("sample_case", vocab=vocab, rows=rows, block=block) <= 5 * (0.25 / (rows // 2)) ** 0.5


def test_sampling_kernel_rejects_too_large_launch() -> None:
    """Philox offsets are int32: a batch x vocabulary of 2**31 or more is refused with a clear error
    (the sampler checks first and keeps the torch path for it)."""
    pytest.importorskip("triton")
    from sglang.engine.layers.fused import triton_ops

    big = torch.empty(2**31 // 1024 + 1, 1024).as_strided((2**31 // 1024 + 1, 1024), (0, 1))  # no memory
    with pytest.raises(ValueError, match="too large for one sampling launch"):
        triton_ops.sample_with_temperature(big, torch.ones(1), seed=0)


def test_cpu_keeps_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors never take the fused path; CUDA tensors do unless SGLANG_DISABLE_FUSED_OPS is set
    (read on the first decision, not at import)."""
    from sglang.engine.layers import fused

    assert not fused.use_fused(torch.zeros(1))
    fake_cuda: Any = SimpleNamespace(is_cuda=True)
    try:
        monkeypatch.setenv("SGLANG_DISABLE_FUSED_OPS", "1")
        fused.set_fused_ops(None)
        assert not fused.use_fused(fake_cuda)
        fused.set_fused_ops(False)
        assert not fused.use_fused(fake_cuda)
        fused.set_fused_ops(True)
        assert fused.use_fused(fake_cuda) == fused._triton_imports()
    finally:
        fused.set_fused_ops(None)


def test_kernels_compile_for_sm90() -> None:
    """Compile the kernels (not the interpreter's path) to H100 cubins without a GPU, for every dtype."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("kernels are interpreted in this process")
    from sglang.engine.layers.fused import triton_ops
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    for dt in ("fp32", "bf16", "fp16"):
        kernels: list[tuple[Any, dict[str, Any], dict[str, str], int]] = [
            (triton_ops._rmsnorm_kernel, {"HAS_RESIDUAL": True, "BLOCK": 8192, "ROWS": 1}, {"eps": "fp32"}, 16),
            (triton_ops._rmsnorm_kernel, {"HAS_RESIDUAL": False, "BLOCK": 1024, "ROWS": 2}, {"eps": "fp32"}, 2),
            (triton_ops._rmsnorm_kernel, {"HAS_RESIDUAL": False, "BLOCK": 128, "ROWS": 16}, {"eps": "fp32"}, 1),
            (triton_ops._rotary_kernel, {"HEAD_DIM": 128, "HALF": 32, "BLOCK_HALF": 32, "BLOCK_HQ": 32, "BLOCK_HK": 8,
                                         "PASS": 64, "BLOCK_PASS": 64},
             {"pos_ptr": "*i64", "cache_ptr": "*fp32"}, 4),
            (triton_ops._rotary_kernel, {"HEAD_DIM": 80, "HALF": 40, "BLOCK_HALF": 64, "BLOCK_HQ": 16, "BLOCK_HK": 2,
                                         "PASS": 0, "BLOCK_PASS": 1},
             {"pos_ptr": "*i64", "cache_ptr": "*fp32"}, 4),
            (triton_ops._silu_and_mul_kernel, {"BLOCK": 1024}, {}, 4),
            (triton_ops._sample_kernel, {"V": 128256, "CHUNK": 32768, "SPLITS": 4, "BLOCK": 2048},
             {"logits_ptr": "*fp32", "inv_temp_ptr": "*fp32", "key_ptr": "*fp32", "idx_ptr": "*i32", "seed": "i64"}, 8),
            (triton_ops._sample_pick_kernel, {"V": 128256, "SPLITS": 4}, {"key_ptr": "*fp32", "idx_ptr": "*i32",
                                                                         "out_ptr": "*i64"}, 1),
        ]
        for kernel, consts, special, warps in kernels:
            sig = {
                n: "constexpr" if n in consts else special.get(n, f"*{dt}" if n.endswith("_ptr") or n in ("q_out", "k_out") else "i32")
                for n in kernel.arg_names
            }
            consts = {**consts, "PDL": dt == "bf16"}  # the PDL path (griddepcontrol) for one dtype
            sig["PDL"] = "constexpr"
            opts = backend.parse_options({"num_warps": warps})
            compiled = triton.compile(ASTSource(kernel, sig, consts), target=target, options=opts.__dict__)
            assert compiled.asm["cubin"]
            assert ("griddepcontrol.wait" in compiled.asm["ptx"]) == consts["PDL"]


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager() -> None:
    """The four ops captured in one CUDA graph, replayed on new inputs, equal eager launches bit for bit."""
    pytest.importorskip("triton")
    from sglang.engine.layers.fused import triton_ops

    dev, dt, t, hidden, n = torch.device("cuda"), torch.bfloat16, 8, 4096, 14336
    with torch.device(dev):
        from sglang.engine.layers.rotary import RopeConfig, RotaryEmbedding

        rot = RotaryEmbedding(RopeConfig(head_dim=128, rotary_dim=128, max_position=8192))
    x = torch.zeros(t, hidden, dtype=dt, device=dev)
    res = torch.zeros_like(x)
    w = torch.randn(hidden, dtype=dt, device=dev)
    gu = torch.zeros(t, 2 * n, dtype=dt, device=dev)
    qkv = torch.zeros(t, 48 * 128, dtype=dt, device=dev)
    pos = torch.zeros(t, dtype=torch.int64, device=dev)

    def step() -> list[torch.Tensor]:
        q, k, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=1)
        normed, summed = triton_ops.fused_add_rmsnorm(x, res, w, 1e-5)
        return [normed, summed, triton_ops.rmsnorm(x, w, 1e-5), *triton_ops.apply_rotary(pos, q, k, rot.cos_sin_cache, 128, 128),
                triton_ops.silu_and_mul(gu)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        gen = torch.Generator(device=dev).manual_seed(seed)
        for buf in (x, res, gu, qkv):
            buf.copy_(torch.randn(buf.shape, generator=gen, device=dev))
        pos.copy_(torch.randint(0, 8192, (t,), generator=gen, device=dev))
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, step(), strict=True):
            assert torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_fused_greedy_matches_hf(tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 engine on CUDA (CUDA graphs, triton attention) whose layers run the fused kernels
    (counted; the rotary runs inside the attention backend's K/V store) produces HF transformers'
    greedy tokens."""
    pytest.importorskip("triton")
    from sglang.engine.attention.triton import backend as triton_backend
    from sglang.engine.engine import Engine
    from sglang.engine.layers import fused
    from sglang.engine.layers.fused import triton_ops

    from tests.helpers.tiny_models import make_tiny_model
    from tests.integration.test_engine_gpu import _hf_greedy

    fused.set_fused_ops(None)
    assert fused.use_fused(torch.zeros(1, device="cuda"))
    calls: dict[str, int] = {}
    for name in ("rmsnorm", "fused_add_rmsnorm", "apply_rotary", "silu_and_mul"):
        def counted(*a: Any, _fn: Any = getattr(triton_ops, name), _name: str = name) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a)
        monkeypatch.setattr(triton_ops, name, counted)

    def rope_store(*a: Any, _fn: Any = triton_backend.rope_store_kv) -> Any:
        calls["rope_store_kv"] = calls.get("rope_store_kv", 0) + 1
        return _fn(*a)
    monkeypatch.setattr(triton_backend, "rope_store_kv", rope_store)

    path = make_tiny_model(family, tmp_path, vocab_size=256, seed=1)
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 17, 200, 512)]
    expected = _hf_greedy(path, prompts, 10, torch.float32)
    eng = Engine(model_path=str(path), skip_tokenizer_init=True, device="cuda", dtype="float32",
                 page_size=16, chunked_prefill_size=64, max_total_tokens=8192)
    try:
        outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 10, "ignore_eos": True})
        assert [o["output_ids"] for o in outs] == expected  # type: ignore[index]
    finally:
        eng.shutdown()
    assert set(calls) >= {"fused_add_rmsnorm", "rope_store_kv", "silu_and_mul"}
    if family == "qwen3":
        assert calls.get("rmsnorm", 0) > 0  # q/k norms


if __name__ == "__main__":
    serve(CASES, _round_bf16_like_gpu)
