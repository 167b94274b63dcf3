"""Triton attention backend: split-K decode and tiled extend kernels over the paged KV pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sglang.engine.attention.base import AttentionBackend, AttentionLayerSpec, Rope
from sglang.engine.attention.triton.common import interpreting
from sglang.engine.attention.triton.decode import (
    DEFAULT_MAX_KV_SPLITS,
    decode_attention,
    decode_launch,
    decode_scratch,
    device_caps,
    pick_num_splits,
    scratch_rows,
)
from sglang.engine.attention.triton.extend import extend_attention, extend_config, extend_tiles
from sglang.engine.attention.triton.store import rope_store_applies, rope_store_kv, store_kv

if TYPE_CHECKING:
    from sglang.engine.runner.forward_batch import ForwardBatch


@dataclass
class _ExtendMeta:
    rows: list[int]
    tiles: dict[int, torch.Tensor] = field(default_factory=dict)  # GQA group -> extend_tiles(...)


class TritonBackend(AttentionBackend):
    """Attention with our own Triton kernels; GPU only (or the Triton CPU interpreter in tests).

    Decode (one token per request) runs a split-K kernel: several programs per (request, KV head)
    each reduce a slice of the context, a second kernel merges the slices. How many: fixed
    ``num_kv_splits``, or by default per batch size (``decode.pick_num_splits``: up to
    ``max_kv_splits`` for small batches, 1 once the batch alone fills the GPU).
    Extend runs a causal tiled kernel over prefix + new tokens. Both gather K/V by slot through
    ``req_to_token``, so any page size works, and both honour ``layer.sliding_window``. Slot ``s``
    is read at page ``s // page_size``, offset ``s % page_size`` of the page-major pool's per-layer
    views (``KVPool.get_kv``; page size a kernel constant). New tokens' K/V are stored by
    ``KVPool.set_kv``, or with ``fused_kv_store`` by one Triton launch per layer (``store.store_kv``,
    the same bytes; the default, checked bit for bit on the GPU by tests/integration/test_kv_store_triton.py).

    CUDA-graph contract (DECODE mode only):

    * Before capture, call ``init_cuda_graph_state(max_bs, num_heads, head_dim, device)`` once.
      It allocates the split-K scratch for up to ``max_bs`` requests; later decode batches of at
      most ``max_bs`` requests reuse it and allocate nothing else persistent.
    * ``init_forward_metadata(batch)`` for a decode batch does no device work and reads no host
      lists; ``forward`` launches kernels whose grids depend only on the batch size, reading
      ``batch.req_pool_indices``, ``batch.seq_lens``, ``batch.out_cache_loc`` and
      ``batch.req_to_token.table`` on the device (no ``.item()``/``.tolist()``/``.cpu()``).
      So capture ``forward`` with a batch built on static tensors; before each replay copy the new
      values into those tensors (nothing needs re-running on the host). Padding entries may use
      ``seq_len`` 0 (their output is zeros) with any valid table row and slot 0 as their
      ``out_cache_loc``.
    * Growing the scratch during capture raises: size ``max_bs`` for the largest captured batch.

    Extend batches use host metadata (the length lists) and are not meant to be captured.
    """

    name = "triton"

    def __init__(
        self, num_kv_splits: int | None = None, fused_kv_store: bool = True, max_kv_splits: int = DEFAULT_MAX_KV_SPLITS,
        decode_block_n: int | None = None, extend_launch: dict[str, int] | None = None, **_: object,
    ) -> None:
        for name, n in (("num_kv_splits", num_kv_splits), ("max_kv_splits", max_kv_splits)):
            if n is not None and (n < 1 or n & (n - 1)):
                raise ValueError(f"{name} must be a power of two, got {n}")
        # None: per batch size (pick_num_splits), else this many splits for every batch.
        self.num_kv_splits = num_kv_splits
        self.max_kv_splits = num_kv_splits or max_kv_splits
        self.fused_kv_store = fused_kv_store
        # (num_heads, head_dim) -> flat (mid_o [rows * H * D], mid_lse [rows * H]) float32
        self._scratch: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._max_bs = 0
        self._caps: tuple[int, bool] | None = None  # (SM count, >= 160 KiB shared memory per block)
        self.decode_block_n = decode_block_n  # None: 128 for one split where shared memory allows, else 64
        # extend_attention's launch keywords; None: extend_config(device, dtype) per call
        self.extend_launch = dict(extend_launch) if extend_launch else None

    def _device_caps(self, device: torch.device) -> tuple[int, bool]:
        if self._caps is None:
            self._caps = device_caps(device)
        return self._caps

    def _decode_tiles(self, splits: int, device: torch.device) -> dict[str, int]:
        """Launch parameters of the decode kernel (``decode.decode_launch``; ``decode_block_n`` overrides the tile)."""
        launch = decode_launch(splits, self._device_caps(device)[1])
        if self.decode_block_n:
            launch["block_n"] = self.decode_block_n
        return launch

    def splits_for(self, bs: int, num_kv_heads: int, device: torch.device) -> int:
        if self.num_kv_splits is not None:
            return self.num_kv_splits
        return pick_num_splits(bs, num_kv_heads, self.max_kv_splits, self._device_caps(device)[0])

    def _rows(self, max_bs: int, device: torch.device) -> int:
        return scratch_rows(max_bs, self.max_kv_splits, self._device_caps(device)[0], fixed=self.num_kv_splits is not None)

    def init_cuda_graph_state(self, max_bs: int, num_heads: int, head_dim: int, device: torch.device | str) -> None:
        """Preallocate the decode scratch for up to ``max_bs`` requests (call before capture)."""
        dev = torch.device(device)
        self._max_bs = max(self._max_bs, max_bs)
        self._scratch[(num_heads, head_dim)] = decode_scratch(self._rows(self._max_bs, dev), num_heads, head_dim, dev)

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.is_decode:
            batch.attn_metadata = None  # decode reads the batch's own device tensors
            return
        batch.attn_metadata = _ExtendMeta(rows=batch.req_rows())

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayerSpec,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        kvh, d = layer.num_kv_heads, layer.head_dim
        t = q.shape[0]
        if q.device.type != "cuda" and not interpreting():
            raise RuntimeError("the triton attention backend needs CUDA tensors; use 'torch_native' on CPU")
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        if self.fused_kv_store:  # one launch for both K and V (set_kv is ~5 small torch kernels)
            store_kv(k_buf, v_buf, batch.out_cache_loc, k, v)
        else:
            batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k.view(t, kvh, d), v.view(t, kvh, d))
        return self._attend(q, k_buf, v_buf, layer, batch)

    def forward_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: AttentionLayerSpec,
        batch: ForwardBatch,
        rope: Rope,
    ) -> torch.Tensor:
        """With the fused K/V store and the layer's fused rotary: one launch rotates q, rotates k
        into the pool and copies v there (``store.rope_store_kv``), then attention as in
        ``forward``; otherwise the layer's rotary, then ``forward``."""
        if self.fused_kv_store and rope.fused:  # ``fused`` implies CUDA tensors
            k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
            if rope_store_applies(q, k, v, k_buf, v_buf):
                q = rope_store_kv(rope.positions, q, k, v, rope.cos_sin_cache, rope.rotary_dim, k_buf, v_buf,
                                  batch.out_cache_loc)
                return self._attend(q, k_buf, v_buf, layer, batch)
        return super().forward_rope(q, k, v, layer, batch, rope)

    def _attend(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, layer: AttentionLayerSpec, batch: ForwardBatch
    ) -> torch.Tensor:
        """Attention of ``q`` over the pool (this step's K/V already stored)."""
        h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        t = q.shape[0]
        q3 = q.view(t, h, d)
        table = batch.req_to_token.table
        if batch.is_decode:
            scratch = self._decode_scratch(t, h, d, q.device)
            splits = self.splits_for(t, kvh, q.device)
            out = decode_attention(
                q3, k_buf, v_buf, table, batch.req_pool_indices, batch.seq_lens, scratch,
                layer.scaling, layer.sliding_window, num_splits=splits,
                **self._decode_tiles(splits, q.device),
            )
        else:
            meta: _ExtendMeta = batch.attn_metadata
            group = h // kvh
            cfg = self.extend_launch or extend_config(q.device, q.dtype)
            tiles = meta.tiles.get(group)
            if tiles is None:
                tiles = extend_tiles(meta.rows, batch.prefix_lens_cpu, batch.extend_lens_cpu, group, q.device,
                                     cfg["block_rows_"])
                meta.tiles[group] = tiles
            out = extend_attention(q3, k_buf, v_buf, table, tiles, layer.scaling, layer.sliding_window, **cfg)
        return out.view(t, h * d)

    def _decode_scratch(
        self, bs: int, num_heads: int, head_dim: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (num_heads, head_dim)
        cur = self._scratch.get(key)
        if cur is not None and cur[1].numel() >= self._rows(bs, device) * num_heads and cur[0].device == device:
            return cur
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"decode scratch for batch size {bs} (heads {num_heads}, head_dim {head_dim}) was not "
                "preallocated; call init_cuda_graph_state(max_bs, num_heads, head_dim, device) before capture"
            )
        self._max_bs = max(self._max_bs, bs)
        cur = decode_scratch(self._rows(self._max_bs, device), num_heads, head_dim, device)
        self._scratch[key] = cur
        return cur
