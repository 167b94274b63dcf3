"""Reference attention backend in plain torch: gathers each request's K/V from the paged pool
through the request-to-token table and runs SDPA per request. Works on CPU and GPU; correctness
first, it is the yardstick for faster backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sglang.engine.attention.base import AttentionBackend, AttentionLayerSpec

if TYPE_CHECKING:
    from sglang.engine.runner.forward_batch import ForwardBatch


@dataclass
class _Meta:
    token_starts: list[int]  # offset of request i's new tokens in the packed axis
    kv_slots: list[torch.Tensor]  # request i's KV slots for its whole context
    masks: list[torch.Tensor | None]  # [ext, seq] bool (True = attend) or None (decode, no window)


class TorchNativeBackend(AttentionBackend):
    name = "torch_native"

    def __init__(self, **_: object) -> None:
        self._window_masks: dict[tuple[int, int], list[torch.Tensor | None]] = {}

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        starts: list[int] = []
        slots: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        off = 0
        table = batch.req_to_token.table
        rows = batch.req_pool_indices.tolist()
        for row, pre, ext in zip(rows, batch.prefix_lens_cpu, batch.extend_lens_cpu, strict=True):
            seq = pre + ext
            starts.append(off)
            off += ext
            slots.append(table[row, :seq])
            if ext == 1:
                masks.append(None)
            else:
                q_pos = torch.arange(pre, seq, device=table.device).unsqueeze(1)
                k_pos = torch.arange(seq, device=table.device).unsqueeze(0)
                masks.append(k_pos <= q_pos)
        batch.attn_metadata = _Meta(starts, slots, masks)
        self._window_masks = {}

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayerSpec,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        meta: _Meta = batch.attn_metadata
        h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        t = q.shape[0]
        batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k.view(t, kvh, d), v.view(t, kvh, d))
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        q = q.view(t, h, d)
        out = torch.empty_like(q)
        for i, ext in enumerate(batch.extend_lens_cpu):
            s = meta.token_starts[i]
            slots = meta.kv_slots[i]
            qi = q[s : s + ext].transpose(0, 1)  # [H, ext, D]
            ki = k_buf[slots].transpose(0, 1).to(q.dtype)  # [KVH, seq, D]
            vi = v_buf[slots].transpose(0, 1).to(q.dtype)
            mask = self._mask(meta, i, layer.sliding_window, batch)
            oi = F.scaled_dot_product_attention(
                qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0),
                attn_mask=mask, scale=layer.scaling, enable_gqa=(h != kvh),
            )
            out[s : s + ext] = oi.squeeze(0).transpose(0, 1)
        return out.reshape(t, h * d)

    def _mask(
        self, meta: _Meta, i: int, window: int | None, batch: ForwardBatch
    ) -> torch.Tensor | None:
        seq = batch.prefix_lens_cpu[i] + batch.extend_lens_cpu[i]
        if window is None or window >= seq:
            return meta.masks[i]
        key = (i, window)
        cached = self._window_masks.get(key)
        if cached is None:
            pre = batch.prefix_lens_cpu[i]
            dev = batch.req_to_token.table.device
            q_pos = torch.arange(pre, seq, device=dev).unsqueeze(1)
            k_pos = torch.arange(seq, device=dev).unsqueeze(0)
            m = (k_pos <= q_pos) & (k_pos > q_pos - window)
            self._window_masks[key] = [m]
            return m
        return cached[0]
