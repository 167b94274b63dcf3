"""ForwardBatch: everything one model forward needs, built by the runner from a scheduled batch.

Tokens of all requests are packed along one axis (``T`` = sum of ``extend_lens``). For request
``i`` the step computes tokens ``prefix_lens[i] .. seq_lens[i]``: a prefill chunk on top of an
existing prefix (EXTEND) or exactly one token (DECODE). The K/V of those tokens are written to
``out_cache_loc`` by the attention backend before attending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sglang.engine.attention.base import AttentionBackend
    from sglang.engine.memory import KVPool, ReqToTokenPool


class ForwardMode(Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    req_pool_indices: torch.Tensor  # [B] rows of the req-to-token table
    seq_lens: torch.Tensor  # [B] tokens in KV after this step
    out_cache_loc: torch.Tensor  # [T] KV slots of the new tokens
    prefix_lens_cpu: list[int]  # [B] tokens already in KV before this step
    extend_lens_cpu: list[int]  # [B] tokens computed this step (1 for DECODE)
    kv_pool: KVPool
    req_to_token: ReqToTokenPool
    attn_backend: AttentionBackend
    # Backend-private per-batch data, filled by ``attn_backend.init_forward_metadata``.
    attn_metadata: Any = field(default=None)
    # ``req_pool_indices`` on the host, when the builder has them (reading the device tensor back
    # would wait for the GPU: no host/GPU overlap).
    req_rows_cpu: list[int] | None = None

    def req_rows(self) -> list[int]:
        return self.req_rows_cpu if self.req_rows_cpu is not None else self.req_pool_indices.tolist()

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_cpu)

    @property
    def seq_lens_cpu(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens_cpu, self.extend_lens_cpu, strict=True)]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())
