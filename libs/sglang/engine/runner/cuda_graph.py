"""CUDA graphs for decode: the whole model forward (and the LM head) of a decode batch is captured
once per batch-size bucket and replayed, so a step costs one graph launch instead of hundreds of
kernel launches.

Contract with the attention backend: it must expose ``init_cuda_graph_state(max_bs, num_heads,
head_dim, device)`` and, in DECODE mode, read only the batch's device tensors (no host syncs, grids
that depend only on the batch size); see ``TritonBackend``. Inputs live in one static int64 buffer
``[5, max_bs]`` (input ids, positions, request rows, sequence lengths, KV slots) that is refilled with
one host-to-device copy before each replay. A batch is padded up to its bucket with entries that
attend to nothing (``seq_len`` 0) and write their K/V into slot 0 (the padding page).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from sglang.engine.runner.forward_batch import ForwardBatch, ForwardMode
from sglang.engine.runner.futures import resolve_futures

if TYPE_CHECKING:
    from sglang.engine.runner.model_runner import ModelInput, ModelRunner

logger = logging.getLogger(__name__)

_IDS, _POS, _ROWS, _LENS, _LOCS = range(5)


def batch_buckets(max_bs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond."""
    sizes = [1, 2, 4, 8]
    step = 8
    while sizes[-1] < max_bs:
        nxt = sizes[-1] + step
        sizes.append(nxt)
        if nxt >= 64:
            step = 16
        if nxt >= 256:
            step = 32
    return [s for s in sizes if s < max_bs] + [max_bs]


class CudaGraphRunner:
    """Captures decode forwards for every bucket up to ``max_bs``; ``run`` replays the smallest
    bucket that fits (callers check :meth:`can_run` first)."""

    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        self.runner = runner
        self.device = runner.device
        self.max_bs = max_bs
        self.buckets = batch_buckets(max_bs)
        info = runner.info
        runner.attn_backend.init_cuda_graph_state(max_bs, info.num_heads, info.head_dim, self.device)  # type: ignore[attr-defined]
        self.inputs = torch.zeros((5, max_bs), dtype=torch.int64, device=self.device)
        self._host = torch.zeros((5, max_bs), dtype=torch.int64).pin_memory()
        self._copied: torch.cuda.Event | None = None  # the last H2D copy out of ``_host``
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool: Any = None
        t0 = time.perf_counter()
        self._capture_all()
        logger.info(
            "CUDA graphs: captured %d decode batch sizes (1..%d) in %.1f s", len(self.buckets), max_bs,
            time.perf_counter() - t0,
        )

    def _batch(self, bs: int) -> ForwardBatch:
        r = self.runner
        x = self.inputs
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=x[_IDS, :bs],
            positions=x[_POS, :bs],
            req_pool_indices=x[_ROWS, :bs],
            seq_lens=x[_LENS, :bs],
            out_cache_loc=x[_LOCS, :bs],
            prefix_lens_cpu=[0] * bs,
            extend_lens_cpu=[1] * bs,
            kv_pool=r.kv_pool,
            req_to_token=r.req_to_token,
            attn_backend=r.attn_backend,
        )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        model = self.runner.model
        batch.attn_backend.init_forward_metadata(batch)
        hidden = model(batch.input_ids, batch.positions, batch)
        return model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self.inputs.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):  # largest first: later graphs reuse its pool memory
                batch = self._batch(bs)
                for _ in range(2):  # compile kernels and settle the allocator outside capture
                    self._forward(batch)
                stream.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    out = self._forward(batch)
                if self.pool is None:
                    self.pool = g.pool()
                self.graphs[bs] = g
                self.outputs[bs] = out
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def can_run(self, inp: ModelInput) -> bool:
        n = len(inp.req_rows)
        return inp.mode is ForwardMode.DECODE and 0 < n <= self.max_bs and inp.logit_indices == list(range(n))

    @torch.inference_mode()
    def run(self, inp: ModelInput) -> torch.Tensor:
        """Replay for ``inp`` (a decode batch); returns logits ``[bs, vocab]`` in the model dtype."""
        n = len(inp.req_rows)
        bs = self.buckets[bisect.bisect_left(self.buckets, n)]
        h = self._host
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy may still be reading ``_host``
        h[:, n:bs] = 0  # padding: token 0 at position 0 of row 0, nothing attended, K/V into slot 0
        h[_IDS, :n] = torch.tensor(inp.input_ids, dtype=torch.int64)
        h[_POS, :n] = torch.tensor(inp.positions, dtype=torch.int64)
        h[_ROWS, :n] = torch.tensor(inp.req_rows, dtype=torch.int64)
        h[_LENS, :n] = torch.tensor([p + e for p, e in zip(inp.prefix_lens, inp.extend_lens, strict=True)])
        host_locs = inp.out_cache_loc.device.type == "cpu"
        h[_LOCS, :n] = inp.out_cache_loc if host_locs else 0
        self.inputs[:, :bs].copy_(h[:, :bs], non_blocking=True)
        if not host_locs:  # already on the device (a req-to-token slice)
            self.inputs[_LOCS, :n].copy_(inp.out_cache_loc)
        self._copied = torch.cuda.Event()
        self._copied.record()
        if inp.future_ids is not None:
            ids = self.inputs[_IDS, :bs]
            ids.copy_(resolve_futures(ids, inp.future_ids))
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
