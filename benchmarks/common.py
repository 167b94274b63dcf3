"""Shared helpers for the benchmarks: models, the hardware header, rooflines, Markdown tables.

Run the benchmarks as scripts from the repository root (``.venv/bin/python benchmarks/one_batch.py``);
this module is imported as ``common`` (the scripts put their own folder on ``sys.path``).

Rule 12 of the design: print what the hardware allows next to what was achieved. ``hardware_info``
measures the two numbers that bound a forward pass -- memory bandwidth (a large tensor copy) and
matmul throughput -- on the CPU (``perf_counter``) or on a CUDA GPU (device-to-device copy of 1 GiB
and a bf16 8192^3 matmul, timed with CUDA events), and ``ModelCost`` turns a model config into bytes
and FLOPs per step, so a benchmark can print "achieved X GB/s of Y" and "floor Z ms/step" next to
its timings.

Models: ``--model-path`` (an HF folder), ``--tiny`` (a small random Llama saved as safetensors), or
``--model-shape NAME`` (``MODEL_SHAPES``: only a config.json is written to the cache folder and the
engine runs with ``load_format="dummy"``; the HF baseline is built from the same config with random
weights). ``add_model_args`` / ``resolve_bench_model`` / ``engine_kwargs`` / ``load_hf_baseline``
give every script the same flags and the same engine settings per device.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The benchmark's tiny random Llama: big enough that a forward pass is more than a handful of
# kernel launches, small enough that Python overhead dominates -- it measures the engine, not BLAS.
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.05,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


# Model shapes for ``--model-shape``: config.json only, dummy weights (no download, no files to
# read). One place for every benchmark (pd_transfer.py keeps its own copy: it runs elsewhere).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
        "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
        "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "initializer_range": 0.02,
    },
    # For smoke tests on a CPU: the tiny Llama's shape, dummy weights.
    "tiny": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY_LLAMA},
}


# Re-exported: the scripts import these from common.
from hardware import (  # noqa: E402, F401
    REPO_ROOT,
    Hardware,
    LoadMeter,
    cpu_model,
    git_commit,
    hardware_info,
    idle_load,
    measure_bandwidth_gbs,
    measure_gpu_bandwidth_gbs,
    measure_gpu_matmul_gflops,
    measure_matmul_gflops,
    release_memory,
    usable_cores,
    wait_for_quiet,
)


# ---- models ----------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$SGLANG_CACHE_DIR`` (else ``~/.cache/sglang``) ``/bench``: where benchmark models live."""
    base = os.environ.get("SGLANG_CACHE_DIR") or os.path.expanduser("~/.cache/sglang")
    return Path(base).resolve() / "bench"


def tiny_llama_path(seed: int = 0, **overrides: Any) -> str:
    """Build (once) a random Llama with the real HF classes and save it as safetensors.

    The folder name carries a hash of the config and seed, so changing ``TINY_LLAMA`` builds a new
    one. No tokenizer is written: run the engine with ``skip_tokenizer_init=True``.
    """
    cfg = {**TINY_LLAMA, **overrides}
    key = hashlib.sha256(json.dumps({"cfg": cfg, "seed": seed}, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"tiny-llama-{key}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return str(path)
    import transformers as tf

    config = tf.LlamaConfig(**cfg)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config).to(torch.float32).eval()
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    model.save_pretrained(str(tmp), safe_serialization=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race; keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def resolve_model(model_path: str | None, tiny: bool) -> tuple[str, str]:
    """``(path, short name)`` for ``--tiny`` / ``--model-path`` / the default model."""
    if tiny:
        return tiny_llama_path(), "tiny-llama (random)"
    if model_path is None:
        from sglang.engine.models.default_model import DEFAULT_MODEL_NAME, default_model_path

        return default_model_path(), DEFAULT_MODEL_NAME
    return model_path, Path(model_path).name


def shape_path(shape: str) -> str:
    """Write (once) ``MODEL_SHAPES[shape]`` as config.json into the cache folder; returns the folder
    (no weights: load it with ``load_format="dummy"``)."""
    cfg = MODEL_SHAPES[shape]
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"shape-{shape}-{key}"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f"config.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(cfg, indent=1))
        os.replace(tmp, path / "config.json")
    return str(path)


@dataclass
class BenchModel:
    """What a benchmark runs: a folder, a display name, and whether the weights are dummy."""

    path: str
    name: str
    dummy: bool  # config.json only: engine load_format="dummy", HF from_config with random weights


def add_model_args(p: argparse.ArgumentParser, default_device: str = "cpu") -> None:
    """The flags every engine benchmark shares (model, device, dtype, engine settings on GPU)."""
    p.add_argument("--model-path", default=None, help="HF folder; default: SmolLM2-135M-Instruct")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (built once into the cache)")
    p.add_argument("--model-shape", default=None, choices=sorted(MODEL_SHAPES),
                   help="a config.json only, dummy weights (engine load_format=dummy, HF from_config)")
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda", "auto"],
                   help=f"where both engines run (default {default_device}; auto: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--attention-backend", default=None,
                   help="default: auto on cuda (triton + CUDA graphs), torch_native on cpu")
    p.add_argument("--disable-cuda-graph", action="store_true", help="run decode eagerly on cuda")
    p.add_argument("--mem-fraction-static", type=float, default=0.85,
                   help="cuda: fraction of GPU memory for weights + KV pool")


def finish_model_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the shared flags and fill in the per-device defaults."""
    if sum(bool(x) for x in (args.tiny, args.model_path, args.model_shape)) > 1:
        p.error("--tiny, --model-path and --model-shape exclude each other")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.attention_backend is None:
        args.attention_backend = "auto" if args.device == "cuda" else "torch_native"


def resolve_bench_model(args: argparse.Namespace) -> BenchModel:
    if args.model_shape:
        return BenchModel(shape_path(args.model_shape), f"{args.model_shape} shape (dummy weights)", True)
    path, name = resolve_model(args.model_path, args.tiny)
    return BenchModel(path, name, False)


def engine_kwargs(args: argparse.Namespace, model: BenchModel) -> dict[str, Any]:
    """Model, device and backend settings for ``sglang.Engine`` from the shared flags (the caller
    adds batching limits; on cuda the KV pool is sized by ``mem_fraction_static``)."""
    kw: dict[str, Any] = {
        "dtype": args.dtype, "device": args.device, "attention_backend": args.attention_backend,
        "load_format": "dummy" if model.dummy else "auto",
    }
    if args.device == "cuda":
        kw["mem_fraction_static"] = args.mem_fraction_static
        kw["disable_cuda_graph"] = args.disable_cuda_graph
    return kw


def prepare_model(args: argparse.Namespace) -> tuple[torch.dtype, BenchModel, Any, ModelCost]:
    """Quiet logs, apply ``--threads``, and resolve ``(dtype, model, HF config, cost model)``."""
    quiet_logs()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    model = resolve_bench_model(args)
    config = load_hf_config(model.path)
    return dtype, model, config, ModelCost.from_config(config, dtype)


def engine_label(args: argparse.Namespace) -> str:
    """``device cuda, attention backend auto, CUDA graphs on`` for a result header."""
    graphs = "" if args.device == "cpu" else ", CUDA graphs off" if args.disable_cuda_graph else ", CUDA graphs on"
    return f"device {args.device}, attention backend {args.attention_backend}{graphs}"


def free_engine(engine: Any) -> None:
    """Shut ``engine`` down and give its GPU memory back before the next engine or HF model."""
    engine.shutdown()
    runner = getattr(engine, "runner", None)
    if runner is not None and getattr(runner, "graphs", None) is not None:
        runner.graphs = None  # captured graphs keep their memory pool alive
    del engine, runner
    release_memory()


def load_hf_baseline(model: BenchModel, dtype: torch.dtype, device: str) -> Any:
    """HF transformers on the same model: ``from_pretrained`` for a folder with weights, or
    ``from_config`` with random weights (built directly on ``device``) for a shape."""
    if not model.dummy:
        return load_hf_model(model.path, dtype).to(device)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    cfg = load_hf_config(model.path)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return hf.to(device).eval()


def sync(device: str) -> None:
    """Wait for the GPU (no-op on cpu): every timed region on cuda starts and ends with one."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_hf_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def load_hf_model(path: str, dtype: torch.dtype) -> Any:
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


# ---- cost model ------------------------------------------------------------------------------
@dataclass
class ModelCost:
    """Bytes and FLOPs of a decoder-only model's forward pass (Llama family, GQA)."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype_bytes: int

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype) -> ModelCost:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            num_layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
        )

    @property
    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        mlp = 3 * h * self.intermediate
        return self.num_layers * (attn + mlp + 2 * h)

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def num_params(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        embed = self.vocab * self.hidden
        return self.layer_params + embed + (0 if self.tied else self.lm_head_params) + self.hidden

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def decode_bytes(self, batch: int, context: int) -> int:
        """Bytes a decode step must read at least: every layer weight and the LM head once, the
        embedding rows of the batch, and the K/V of every context token of every request."""
        return self.decode_step_bytes(batch, batch * context)

    def decode_step_bytes(self, batch: int, total_context: int) -> int:
        """``decode_bytes`` for a batch whose contexts add up to ``total_context`` tokens."""
        weights = (self.layer_params + self.lm_head_params + self.hidden) * self.dtype_bytes
        embed_rows = batch * self.hidden * self.dtype_bytes
        return weights + embed_rows + total_context * self.kv_bytes_per_token()

    def decode_step_flops(self, batch: int, total_context: int) -> float:
        """FLOPs of one decode step: one token per request attending to ``total_context`` keys in all."""
        dense = 2.0 * (self.layer_params + self.lm_head_params) * batch
        return dense + 4.0 * self.num_layers * self.num_heads * self.head_dim * total_context

    def forward_flops(self, new_tokens: int, context_after: int, logits_rows: int) -> float:
        """FLOPs of one request's forward: ``new_tokens`` tokens ending at ``context_after``
        (causal), with LM-head logits for ``logits_rows`` rows."""
        dense = 2.0 * self.layer_params * new_tokens
        start = context_after - new_tokens
        # Scores and weighted sum: 2 matmuls x 2 FLOPs per (query, key, head, dim).
        keys = new_tokens * start + new_tokens * (new_tokens + 1) // 2
        attn = 4.0 * self.num_layers * self.num_heads * self.head_dim * keys
        head = 2.0 * self.lm_head_params * logits_rows
        return dense + attn + head




# ---- output ----------------------------------------------------------------------------------
def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN: not measured
                return "-"
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))]
    body = [
        "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric, strict=True)) + " |"
        for r in cells
    ]
    return "\n".join([line, sep, *body])


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)
    exe = os.path.relpath(sys.executable, REPO_ROOT) if sys.executable.startswith(str(REPO_ROOT)) else "python3"
    return f"{exe} {script} {args}".strip()


def append_section(path: str, title: str, body: str) -> None:
    """Append ``## title`` + body (with date and command) to the Markdown file at ``path``."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = f"\n## {title}\n\n{stamp}, `{command_line()}`\n\n{body.rstrip()}\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def quiet_logs() -> None:
    """Keep HF's and our INFO logs out of the tables."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
