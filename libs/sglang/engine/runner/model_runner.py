"""Model runner: owns the model, the KV pool and the attention backend; runs one forward.

The scheduler hands it a :class:`ModelInput` (packed tokens of a batch plus where their K/V go)
and gets back :class:`ModelOutput` (logits of the positions it asked for, in the model dtype). The runner
knows nothing of requests; the scheduler knows nothing of tensors' layout beyond slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from sglang.engine.attention import create_backend, resolve_backend_name
from sglang.engine.memory import KVPool, PageAllocator, ReqToTokenPool
from sglang.engine.models.loader import load_model, resolve_device
from sglang.engine.runner.cuda_graph import CudaGraphRunner
from sglang.engine.runner.forward_batch import ForwardBatch, ForwardMode
from sglang.engine.runner.futures import resolve_futures
from sglang.settings import CacheSettings, ModelSettings, SchedulerSettings
from sglang.utils.tensors import to_device

logger = logging.getLogger(__name__)


@dataclass
class ModelInput:
    """One forward. Lists are per request, in batch order; tokens are packed in the same order."""

    mode: ForwardMode
    input_ids: list[int]
    positions: list[int]
    out_cache_loc: torch.Tensor  # [T] KV slots of the new tokens (on the device, or on the host for decode)
    req_rows: list[int]  # req-to-token rows
    prefix_lens: list[int]
    extend_lens: list[int]
    logit_indices: list[int]  # packed token indices whose logits are wanted, in output order
    # Overlap scheduling: input ids ``-(row + 1)`` stand for ``future_ids[row]`` (device tensor).
    future_ids: torch.Tensor | None = None


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [len(logit_indices), vocab] in the model dtype (the sampler converts as needed)


class ModelRunner:
    def __init__(self, model: ModelSettings, cache: CacheSettings, sched: SchedulerSettings, model_path: str) -> None:
        self.device = resolve_device(model.device)
        self.model: Any
        self.model, self.hf_config, self.info = load_model(
            model_path, model.load_format, model.dtype, str(self.device), model.seed
        )
        self.dtype = next(self.model.parameters()).dtype
        if model.context_length is not None and model.context_length > self.info.context_length:
            raise ValueError(
                f"context_length={model.context_length} exceeds the model's max_position_embeddings "
                f"({self.info.context_length}); lower it"
            )
        self.context_length = model.context_length or self.info.context_length
        self.page_size = cache.page_size
        kv_dtype = self.dtype if cache.kv_cache_dtype == "auto" else getattr(torch, cache.kv_cache_dtype)
        num_pages = self._num_pages(cache, kv_dtype)
        self.kv_pool = KVPool(
            num_pages, self.page_size, self.info.num_layers, self.info.num_kv_heads, self.info.head_dim,
            kv_dtype, self.device,
        )
        self.allocator = PageAllocator(num_pages, self.page_size)
        max_ctx = -(-self.context_length // self.page_size) * self.page_size
        self.req_to_token = ReqToTokenPool(sched.max_running_requests + 1, max_ctx, self.device)
        self.attn_backend = create_backend(resolve_backend_name(sched.attention_backend, self.device))
        logger.info(
            "KV pool: %d pages x %d tokens (%.1f MiB, %s) on %s",
            num_pages, self.page_size, self.kv_pool.nbytes / 2**20, kv_dtype, self.device,
        )
        self.graphs: CudaGraphRunner | None = None
        if self.device.type == "cuda" and not sched.disable_cuda_graph:
            if hasattr(self.attn_backend, "init_cuda_graph_state"):
                self.graphs = CudaGraphRunner(self, min(sched.cuda_graph_max_bs, sched.max_running_requests))
            else:
                logger.info("CUDA graphs off: attention backend %s cannot be captured", self.attn_backend.name)

    @property
    def max_total_tokens(self) -> int:
        return self.allocator.num_pages * self.page_size

    def _num_pages(self, cache: CacheSettings, kv_dtype: torch.dtype) -> int:
        per_token = KVPool.bytes_per_token(self.info.num_layers, self.info.num_kv_heads, self.info.head_dim, kv_dtype)
        if cache.max_total_tokens is not None:
            tokens = cache.max_total_tokens
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1.0 - cache.mem_fraction_static)
            tokens = int(max(budget, 0) // per_token)
        else:
            tokens = int(cache.cpu_kv_cache_gib * 2**30 // per_token)
        pages = tokens // self.page_size
        if pages < 1:
            raise ValueError(
                f"max_total_tokens={tokens} holds no whole page of page_size={self.page_size}; raise it"
            )
        return pages

    @torch.inference_mode()
    def forward(self, inp: ModelInput) -> ModelOutput:
        self.req_to_token.flush()  # staged page-table writes, before anything reads the table
        if self.graphs is not None and self.graphs.can_run(inp):
            return ModelOutput(logits=self.graphs.run(inp))
        dev = self.device
        input_ids = to_device(inp.input_ids, torch.int64, dev)
        if inp.future_ids is not None:
            input_ids = resolve_futures(input_ids, inp.future_ids)
        batch = ForwardBatch(
            mode=inp.mode,
            input_ids=input_ids,
            positions=to_device(inp.positions, torch.int64, dev),
            req_pool_indices=to_device(inp.req_rows, torch.int64, dev),
            seq_lens=to_device([p + e for p, e in zip(inp.prefix_lens, inp.extend_lens, strict=True)], torch.int64, dev),
            out_cache_loc=to_device(inp.out_cache_loc, torch.int64, dev),
            prefix_lens_cpu=inp.prefix_lens,
            extend_lens_cpu=inp.extend_lens,
            kv_pool=self.kv_pool,
            req_to_token=self.req_to_token,
            attn_backend=self.attn_backend,
            req_rows_cpu=inp.req_rows,
        )
        self.attn_backend.init_forward_metadata(batch)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        idx = to_device(inp.logit_indices, torch.int64, dev)
        logits = self.model.compute_logits(hidden.index_select(0, idx))
        return ModelOutput(logits=logits)
