"""The triton attention backend against the torch_native reference.

Each case builds a two-layer page-major KV pool (attending with layer 1) with shuffled pages and shuffled table rows, fills the
pool with noise (stale slots must never be read), writes the requests' prefixes, and compares
``TritonBackend.forward`` with ``TorchNativeBackend.forward`` on the same packed q/k/v (q is a
non-contiguous slice of a fused qkv, as in the models).

Devices: ``interpret`` runs the kernels in Triton's CPU interpreter. ``TRITON_INTERPRET=1`` must be
set before the kernels are decorated, so those cases run in one worker subprocess (this file run
as a script) that the tests talk to over JSON lines; shapes are small. ``cuda`` (marked gpu) runs
in-process with larger shapes, plus a CUDA-graph capture/replay check and an engine end to end.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.triton_worker import device_runner, interpreter_fixture, serve

pytestmark = pytest.mark.integration

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ATOL = {"float32": 1e-4, "bfloat16": 3e-2}


# ---------------------------------------------------------------- cases (run in either process)


def attention_case(
    device: str,
    dtype: str,
    decode: bool,
    prefix_lens: list[int],
    extend_lens: list[int],
    page_size: int,
    group: int,
    head_dim: int,
    num_kv_heads: int = 2,
    window: int | None = None,
    num_kv_splits: int | None = None,
    decode_block_n: int | None = None,
    extend_launch: dict[str, int] | None = None,
    seed: int = 0,
) -> float:
    """Max |triton - torch_native| over one layer's forward of a batch built from the lengths."""
    from sglang.engine.attention.torch_native import TorchNativeBackend
    from sglang.engine.attention.triton.backend import TritonBackend
    from sglang.engine.layers.attention import Attention
    from sglang.engine.memory import KVPool, ReqToTokenPool
    from sglang.engine.runner.forward_batch import ForwardBatch, ForwardMode

    dev, dt = torch.device(device), DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seqs = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
    npages = [-(-s // page_size) for s in seqs]
    num_pages = sum(npages) + 3
    pool = KVPool(num_pages, page_size, 2, num_kv_heads, head_dim, dt, dev)  # layer 1: strided, offset views
    pool.buffer.copy_(torch.randn(pool.buffer.shape, generator=gen).to(dt))
    r2t = ReqToTokenPool(len(seqs) + 3, max(seqs) + page_size, dev)
    pages = list(range(1, num_pages + 1))
    rng.shuffle(pages)
    rows = rng.sample(range(len(seqs) + 3), len(seqs))
    slots = []
    for row, n, s in zip(rows, npages, seqs, strict=True):
        mine, pages = pages[:n], pages[n:]
        req_slots = torch.tensor([p * page_size + o for p in mine for o in range(page_size)])[:s]
        r2t.write(row, 0, req_slots)
        slots.append(req_slots)
    t, h = sum(extend_lens), num_kv_heads * group
    qkv = torch.randn((t, (h + 2 * num_kv_heads) * head_dim), generator=gen).to(dt).to(dev)
    q, k, v = qkv.split([h * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    layer = Attention(1, h, num_kv_heads, head_dim, sliding_window=window)

    def run(backend: Any) -> torch.Tensor:
        batch = ForwardBatch(
            mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            input_ids=torch.zeros(t, dtype=torch.int64, device=dev),
            positions=torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seqs, strict=True)]).to(dev),
            req_pool_indices=torch.tensor(rows, device=dev),
            seq_lens=torch.tensor(seqs, device=dev),
            out_cache_loc=torch.cat([sl[p:] for sl, p in zip(slots, prefix_lens, strict=True)]).to(dev),
            prefix_lens_cpu=list(prefix_lens), extend_lens_cpu=list(extend_lens),
            kv_pool=pool, req_to_token=r2t, attn_backend=backend,
        )
        backend.init_forward_metadata(batch)
        return backend.forward(q, k, v, layer, batch)

    ref = run(TorchNativeBackend())
    got = run(TritonBackend(num_kv_splits=num_kv_splits, decode_block_n=decode_block_n, extend_launch=extend_launch))
    assert got.shape == ref.shape and got.dtype == ref.dtype
    return float((got.float() - ref.float()).abs().max())


def model_case(device: str, family: str, page_size: int) -> float:
    """Max |logit difference| of a tiny model run through prefix + extend + decode with triton
    versus torch_native (float32)."""
    from sglang.engine.models.loader import load_model

    from tests.helpers.forward import run_prefill
    from tests.helpers.tiny_models import make_tiny_model

    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 9, 70, 130)]
    split = [0, 4, 17, 100]
    with tempfile.TemporaryDirectory() as d:
        path = make_tiny_model(family, d, vocab_size=256, seed=3)
        model, _, info = load_model(str(path), "safetensors", "float32", device, 0)
    ref = run_prefill(model, info, prompts, page_size, "torch_native", prefix_split=split)
    got = run_prefill(model, info, prompts, page_size, "triton", prefix_split=split)
    return max(float((g - r).abs().max()) for g, r in zip(got, ref, strict=True))


CASES: dict[str, Callable[..., float]] = {"attention_case": attention_case, "model_case": model_case}


# ---------------------------------------------------------------- pytest side


interpreter = interpreter_fixture(__file__)


Run = Callable[..., float]


@pytest.fixture
def run(request: pytest.FixtureRequest) -> Run:
    """``run(fn_name, **kwargs)`` on the test's device (``device`` parameter)."""
    return device_runner(request, CASES)


def _param(device: str, *values: Any) -> Any:
    marks = [pytest.mark.gpu] if device == "cuda" else []
    return pytest.param(device, *values, marks=marks, id="-".join(map(str, (device, *values))))


def _grid() -> list[Any]:
    """(device, dtype, page_size, group, head_dim): every combination on cuda; on the interpreter
    every float32 combination and two bfloat16 ones, to stay fast."""
    out = []
    for device, dtype, ps, group, hd in product(["interpret", "cuda"], DTYPES, [1, 16], [1, 4, 8], [64, 128]):
        if device == "interpret" and dtype == "bfloat16" and (ps, group, hd) not in {(16, 4, 128), (1, 8, 64)}:
            continue
        out.append(_param(device, dtype, ps, group, hd))
    return out


DEVICES = [_param("interpret"), _param("cuda")]
DECODE_SEQS = {"interpret": [1, 7, 100, 701], "cuda": [1, 7, 100, 777, 3000, 4099, *range(5, 2000, 61)]}
EXTEND_LENS = {  # (prefix, extend) per request: prefix 0, extend 1, unaligned prefixes, long extends
    "interpret": [(0, 1), (0, 37), (5, 1), (90, 20), (17, 70)],
    "cuda": [(0, 1), (0, 1000), (513, 1), (2000, 300), (17, 64), (0, 4096), (100, 129)],
}


@pytest.mark.parametrize(("device", "dtype", "page_size", "group", "head_dim"), _grid())
def test_decode_matches_torch_native(run: Run, device: str, dtype: str, page_size: int, group: int, head_dim: int) -> None:
    seqs = DECODE_SEQS[device]
    err = run(
        "attention_case", dtype=dtype, decode=True, prefix_lens=[s - 1 for s in seqs], extend_lens=[1] * len(seqs),
        page_size=page_size, group=group, head_dim=head_dim,
    )
    assert err < ATOL[dtype]


@pytest.mark.parametrize(("device", "dtype", "page_size", "group", "head_dim"), _grid())
def test_extend_matches_torch_native(run: Run, device: str, dtype: str, page_size: int, group: int, head_dim: int) -> None:
    pre, ext = zip(*EXTEND_LENS[device], strict=True)
    err = run(
        "attention_case", dtype=dtype, decode=False, prefix_lens=list(pre), extend_lens=list(ext),
        page_size=page_size, group=group, head_dim=head_dim,
    )
    assert err < ATOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("window", "splits", "head_dim"), [(None, 1, 80), (33, 4, 64), (1, 16, 64)])
def test_window_splits_and_odd_head_dim(run: Run, device: str, window: int | None, splits: int, head_dim: int) -> None:
    """Sliding windows (down to 1 token), 1 and 4 KV splits, and a head_dim that is not a power of 2."""
    seqs = DECODE_SEQS[device]
    pre, ext = zip(*EXTEND_LENS[device], strict=True)
    common = {"dtype": "float32", "page_size": 16, "group": 4, "head_dim": head_dim, "window": window}
    decode_err = run(
        "attention_case", decode=True, prefix_lens=[s - 1 for s in seqs], extend_lens=[1] * len(seqs),
        num_kv_splits=splits, **common,
    )
    extend_err = run("attention_case", decode=False, prefix_lens=list(pre), extend_lens=list(ext), **common)
    assert decode_err < ATOL["float32"] and extend_err < ATOL["float32"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("splits", "block_n", "dtype"), [(1, 128, "bfloat16"), (1, 128, "float32"), (4, 32, "float32")])
def test_decode_tile_sizes(run: Run, device: str, splits: int, block_n: int, dtype: str) -> None:
    """The large-batch launch (one split written straight to the output, 128-token tiles) and
    small tiles, against torch_native."""
    seqs = DECODE_SEQS[device]
    err = run(
        "attention_case", dtype=dtype, decode=True, prefix_lens=[s - 1 for s in seqs], extend_lens=[1] * len(seqs),
        page_size=16, group=4, head_dim=128, num_kv_splits=splits, decode_block_n=block_n,
    )
    assert err < ATOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rows", "block_n", "stages", "window", "page_size", "dtype"), [
    (128, 32, 3, None, 1, "bfloat16"), (128, 32, 3, 33, 16, "float32"), (64, 64, 2, None, 16, "float32"),
    (128, 64, 2, 1, 1, "float32"),
])
def test_extend_launch_configs(
    run: Run, device: str, rows: int, block_n: int, stages: int, window: int | None, page_size: int, dtype: str
) -> None:
    """Extend tiles of 64 and 128 query rows with 32- and 64-key steps (the masked first and last
    tiles and the unmasked ones between them), with and without sliding windows."""
    pre, ext = zip(*EXTEND_LENS[device], strict=True)
    err = run(
        "attention_case", dtype=dtype, decode=False, prefix_lens=list(pre), extend_lens=list(ext),
        page_size=page_size, group=4, head_dim=128, window=window,
        extend_launch={"block_rows_": rows, "block_n": block_n, "num_warps": 4, "num_stages": stages},
    )
    assert err < ATOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("family", "page_size"), [("llama", 16), ("mistral", 1), ("qwen3", 16)])
def test_tiny_model_logits_match(run: Run, device: str, family: str, page_size: int) -> None:
    """A whole model (GQA; mistral and qwen3 with sliding windows; qwen3 head_dim 32) through
    prefix + extend + decode gives the torch_native logits."""
    assert run("model_case", family=family, page_size=page_size) < 1e-4


@pytest.mark.gpu
def test_decode_cuda_graph_replay() -> None:
    """Capture one decode forward (8B-like layer, bf16) in a CUDA graph at tiny lengths, then
    replay it with new lengths, slots and q/k/v copied into the static tensors: the replay equals
    an eager run bit for bit and matches torch_native."""
    pytest.importorskip("triton")
    from sglang.engine.attention.torch_native import TorchNativeBackend
    from sglang.engine.attention.triton.backend import TritonBackend
    from sglang.engine.layers.attention import Attention
    from sglang.engine.memory import KVPool, ReqToTokenPool
    from sglang.engine.runner.forward_batch import ForwardBatch, ForwardMode

    dev, bs, kvh, h, d, ps, ctx = torch.device("cuda"), 8, 8, 32, 128, 16, 4096
    num_pages = bs * ctx // ps
    pool = KVPool(num_pages, ps, 1, kvh, d, torch.bfloat16, dev)
    pool.buffer.normal_()
    r2t = ReqToTokenPool(bs + 1, ctx, dev)
    rows = torch.arange(1, bs + 1, device=dev)
    seq_lens = torch.ones(bs, dtype=torch.int64, device=dev)
    loc = torch.zeros(bs, dtype=torch.int64, device=dev)
    qkv = torch.zeros((bs, (h + 2 * kvh) * d), dtype=torch.bfloat16, device=dev)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=1)
    layer = Attention(0, h, kvh, d)

    def batch(seqs: list[int], backend: Any) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=torch.zeros(bs, dtype=torch.int64, device=dev),
            positions=seq_lens - 1, req_pool_indices=rows, seq_lens=seq_lens, out_cache_loc=loc,
            prefix_lens_cpu=[s - 1 for s in seqs], extend_lens_cpu=[1] * bs,
            kv_pool=pool, req_to_token=r2t, attn_backend=backend,
        )

    def fill(seqs: list[int], seed: int) -> None:
        gen = torch.Generator(device=dev).manual_seed(seed)
        perm = torch.randperm(num_pages * ps, generator=gen, device=dev) + ps  # skip the padding page
        off = 0
        for i, s in enumerate(seqs):
            r2t.table[i + 1, :s] = perm[off : off + s]
            off += s
        seq_lens.copy_(torch.tensor(seqs, device=dev))
        loc.copy_(r2t.table[rows, seq_lens - 1])
        qkv.copy_(torch.randn(qkv.shape, generator=gen, device=dev))

    graphed = TritonBackend()
    graphed.init_cuda_graph_state(bs, h, d, dev)
    fill([1] * bs, 0)
    captured = batch([1] * bs, graphed)
    graphed.init_forward_metadata(captured)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.forward(q, k, v, layer, captured)  # warm-up compiles the kernels outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graphed.forward(q, k, v, layer, captured)

    for seed, seqs in [(1, [1, 7, 100, 777, 3000, 4096, 2, 65]), (2, [4000, 1, 1, 33, 500, 16, 17, 1000])]:
        fill(seqs, seed)
        graph.replay()
        torch.cuda.synchronize()
        eager_backend = TritonBackend()
        eager_batch = batch(seqs, eager_backend)
        eager_backend.init_forward_metadata(eager_batch)
        eager = eager_backend.forward(q, k, v, layer, eager_batch)
        assert torch.equal(out, eager)
        ref_backend = TorchNativeBackend()
        ref_batch = batch(seqs, ref_backend)
        ref_backend.init_forward_metadata(ref_batch)
        ref = ref_backend.forward(q, k, v, layer, ref_batch)
        assert float((out.float() - ref.float()).abs().max()) < ATOL["bfloat16"]


@pytest.mark.gpu
@pytest.mark.parametrize(("family", "page_size"), [("llama", 16), ("mistral", 1)])
def test_engine_auto_backend_greedy_matches_torch_native(tmp_path: Path, family: str, page_size: int) -> None:
    """An engine on CUDA with the default ``auto`` backend runs triton and produces the same
    greedy tokens as torch_native in float32."""
    pytest.importorskip("triton")
    from sglang.engine.engine import Engine

    from tests.helpers.tiny_models import make_tiny_model

    path = make_tiny_model(family, tmp_path, vocab_size=256, seed=1)
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 17, 200, 512)]
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    outs: dict[str, list[list[int]]] = {}
    for backend in ("torch_native", "auto"):
        eng = Engine(
            model_path=str(path), skip_tokenizer_init=True, device="cuda", dtype="float32", attention_backend=backend,
            page_size=page_size, chunked_prefill_size=64, max_total_tokens=8192,
        )
        try:
            assert eng.runner.attn_backend.name == ("torch_native" if backend == "torch_native" else "triton")
            outs[backend] = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]
        finally:
            eng.shutdown()
    assert outs["auto"] == outs["torch_native"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dtype: str) -> None:
    """Compile the GPU path (not the interpreter's) to an H100 cubin without a GPU: catches what
    only the compiler checks (non-constexpr globals, dot shapes, type mismatches)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("kernels are interpreted in this process")
    from sglang.engine.attention.triton import decode, extend
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    fp32 = dtype == "fp32"
    common = {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_N": 64, "DOT_FP32": fp32, "INTERP": False}
    kernels = [
        (decode._decode_split_kernel, {"GROUP": 4, "BLOCK_H": 16, "NUM_SPLITS": 16, "DIRECT": False,
                                       **common}),
        (decode._decode_split_kernel, {"GROUP": 4, "BLOCK_H": 16, "NUM_SPLITS": 1, "DIRECT": True,
                                       **common}),
        (extend._extend_kernel, {"GROUP": 4, "BLOCK_R": 64, **common}),
        (extend._extend_kernel, {"GROUP": 4, "BLOCK_R": 128, **common, "BLOCK_N": 32}),
        (decode._decode_merge_kernel, {"HEAD_DIM": 128, "BLOCK_D": 128, "NUM_SPLITS": 16}),
    ]
    pointers = {"q_ptr": dtype, "k_buf": dtype, "v_buf": dtype, "out_ptr": dtype, "table_ptr": "i64",
                "rows_ptr": "i64", "seq_lens_ptr": "i64", "tiles_ptr": "i32", "mid_o": "fp32", "mid_lse": "fp32"}
    for kernel, consts in kernels:
        if "PDL" in kernel.arg_names:  # the decode kernels: the PDL path (griddepcontrol) for bf16
            consts = {**consts, "PDL": not fp32}
        sig = {n: "constexpr" if n in consts else f"*{pointers[n]}" if n in pointers else "i32" for n in kernel.arg_names}
        if "qk_scale" in sig:
            sig["qk_scale"] = "fp32"
        opts = backend.parse_options({"num_warps": 4, "num_stages": 2})
        compiled = triton.compile(ASTSource(kernel, sig, consts), target=target, options=opts.__dict__)
        assert compiled.asm["cubin"]


def test_resolve_backend_name() -> None:
    from sglang.engine.attention import available_backends, resolve_backend_name

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert {"auto", "torch_native", "triton"} <= set(available_backends())
    assert resolve_backend_name("auto", cpu) == "torch_native"
    assert resolve_backend_name("torch_native", cuda) == "torch_native"
    try:
        import triton  # noqa: F401

        expected = "triton"
    except ImportError:
        expected = "torch_native"
    assert resolve_backend_name("auto", cuda) == expected
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            resolve_backend_name("triton", cpu)


def test_num_kv_splits_must_be_power_of_two() -> None:
    pytest.importorskip("triton")
    from sglang.engine.attention.triton.backend import TritonBackend

    with pytest.raises(ValueError, match="power of two"):
        TritonBackend(num_kv_splits=12)


if __name__ == "__main__":
    serve(CASES)
