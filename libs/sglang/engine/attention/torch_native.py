"""Reference attention backend in plain torch: gathers each request's K/V from the paged pool
through the request-to-token table (slots turned into the pool's token rows once per batch, see
``KVPool.token_rows``) and runs SDPA per request. Works on CPU and GPU; correctness
first, it is the yardstick for faster backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sglang.engine.attention.base import AttentionBackend, AttentionLayerSpec

if TYPE_CHECKING:
    from sglang.engine.memory import KVPool
    from sglang.engine.runner.forward_batch import ForwardBatch


@dataclass
class _Meta:
    token_starts: list[int]  # offset of request i's new tokens in the packed axis
    kv_rows: list[torch.Tensor]  # request i's KV token rows (KVPool.token_rows) for its context; [] in DECODE
    masks: list[torch.Tensor | None]  # [ext, seq] bool (True = attend) or None (decode, no window)
    out_rows: torch.Tensor  # token rows of batch.out_cache_loc (where every layer writes the new K/V)
    # DECODE batches run as one padded SDPA call: token rows [B * L] (padding -> slot 0) and positions.
    padded_rows: torch.Tensor | None = None
    key_pos: torch.Tensor | None = None  # [1, L] key positions 0..L-1
    seq_lens: torch.Tensor | None = None  # [B, 1]


class TorchNativeBackend(AttentionBackend):
    name = "torch_native"

    def __init__(self, **_: object) -> None:
        self._window_masks: dict[tuple[int, int], list[torch.Tensor | None]] = {}

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        starts: list[int] = []
        rows_of: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        off = 0
        table = batch.req_to_token.table
        rows = batch.req_rows()
        for row, pre, ext in zip(rows, batch.prefix_lens_cpu, batch.extend_lens_cpu, strict=True):
            seq = pre + ext
            starts.append(off)
            off += ext
            if not batch.is_decode:  # decode reads the padded rows below
                rows_of.append(batch.kv_pool.token_rows(table[row, :seq]))
            if ext == 1:
                masks.append(None)
            else:
                q_pos = torch.arange(pre, seq, device=table.device).unsqueeze(1)
                k_pos = torch.arange(seq, device=table.device).unsqueeze(0)
                masks.append(k_pos <= q_pos)
        meta = _Meta(starts, rows_of, masks, batch.kv_pool.token_rows(batch.out_cache_loc.long()))
        if batch.is_decode:
            max_len = max(batch.prefix_lens_cpu) + 1
            meta.padded_rows = batch.kv_pool.token_rows(table[batch.req_pool_indices, :max_len].reshape(-1))
            meta.key_pos = torch.arange(max_len, device=table.device).unsqueeze(0)
            meta.seq_lens = batch.seq_lens.unsqueeze(1)
            # Slots past a request's length may hold stale ids; they are masked out below.
        batch.attn_metadata = meta
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
        pool = batch.kv_pool
        pool.set_kv_rows(layer.layer_id, meta.out_rows, k.view(t, kvh, d), v.view(t, kvh, d))
        q = q.view(t, h, d)
        if meta.padded_rows is not None:
            return self._decode_padded(q, pool, layer, meta).reshape(t, h * d)
        out = torch.empty_like(q)
        for i, ext in enumerate(batch.extend_lens_cpu):
            s = meta.token_starts[i]
            qi = q[s : s + ext].transpose(0, 1)  # [H, ext, D]
            ki, vi = pool.gather_kv_rows(layer.layer_id, meta.kv_rows[i])
            ki = ki.transpose(0, 1).to(q.dtype)  # [KVH, seq, D]
            vi = vi.transpose(0, 1).to(q.dtype)
            mask = self._mask(meta, i, layer.sliding_window, batch)
            oi = F.scaled_dot_product_attention(
                qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0),
                attn_mask=mask, scale=layer.scaling, enable_gqa=(h != kvh),
            )
            out[s : s + ext] = oi.squeeze(0).transpose(0, 1)
        return out.reshape(t, h * d)

    @staticmethod
    def _decode_padded(q: torch.Tensor, pool: KVPool, layer: AttentionLayerSpec, meta: _Meta) -> torch.Tensor:
        """All decode requests in one SDPA call over their KV padded to the longest context."""
        assert meta.padded_rows is not None and meta.key_pos is not None and meta.seq_lens is not None
        b, n = q.shape[0], meta.key_pos.shape[1]
        # One index_select per buffer over precomputed flat rows: several times faster than k[page, off].
        kf, vf = pool.gather_kv_rows(layer.layer_id, meta.padded_rows)
        ki = kf.view(b, n, *kf.shape[1:]).transpose(1, 2).to(q.dtype)  # [B, KVH, L, D]
        vi = vf.view(b, n, *vf.shape[1:]).transpose(1, 2).to(q.dtype)
        valid = meta.key_pos < meta.seq_lens  # [B, L]
        if layer.sliding_window is not None:
            valid = valid & (meta.key_pos >= meta.seq_lens - layer.sliding_window)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), ki, vi, attn_mask=valid[:, None, None, :], scale=layer.scaling,
            enable_gqa=(layer.num_heads != layer.num_kv_heads),
        )  # [B, H, 1, D]
        return o.squeeze(2)

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
