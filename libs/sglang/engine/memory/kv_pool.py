"""Paged KV pool, page-major: one tensor holds every page's K and V for all layers.

``buffer`` is ``[num_pages + 1, num_layers, 2, page_size, num_kv_heads, head_dim]`` (index 0/1 of
the third axis is K/V). Page 0 is the padding page. Token slot ``s`` is offset ``s % page_size`` of
page ``s // page_size``. Because one page of *all* layers is one contiguous block
(``page_bytes_all_layers``), a run of consecutive pages is one contiguous range of memory: KV
transfer registers the one tensor and moves a request's pages with one descriptor per run
(vLLM's "cross-layer" blocks). The price is that a layer's K (or V) is a strided view, so readers
address a slot by (page, offset) with the strides of ``get_kv``, or gather through ``token_rows``.
"""

from __future__ import annotations

import torch

PAGE_MAJOR = "page_major"


class KVPool:
    """Owns the KV tensor. Writers: the attention backend (``set_kv``) and KV transfer (whole
    pages). Readers: attention backends (``get_kv`` views and strides, ``gather_kv``)."""

    memory_layout = PAGE_MAJOR  # part of the KV transfer layout hash

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_pages + 1, num_layers, 2, page_size, num_kv_heads, head_dim)
        self.buffer = torch.zeros(shape, dtype=dtype, device=self.device)
        # Token rows: the buffer as [rows, KVH, D]; (page, layer, kv, offset) is row
        # ((page * L + layer) * 2 + kv) * page_size + offset. A per-layer view that starts at
        # row (layer * 2 + kv) * page_size turns the layer-independent row of a slot (see
        # ``token_rows``) into that layer's K or V row, so gathers need no per-layer arithmetic.
        rows = self.buffer.view(-1, num_kv_heads, head_dim)
        self._k_rows = [rows[(2 * i) * page_size :] for i in range(num_layers)]
        self._v_rows = [rows[(2 * i + 1) * page_size :] for i in range(num_layers)]
        self._k = [self.buffer[:, i, 0] for i in range(num_layers)]
        self._v = [self.buffer[:, i, 1] for i in range(num_layers)]
        self._rows_per_page = num_layers * 2 * page_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def page_bytes_all_layers(self) -> int:
        """Bytes of one page: K and V of every layer, contiguous (``buffer[p]``)."""
        return self.buffer[0].numel() * self.buffer.element_size()

    def token_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Layer-independent row ids of token ``slots`` for ``gather_kv_rows`` (same shape):
        ``page * rows_per_page + offset`` = ``slot + page * (rows_per_page - page_size)``."""
        ps = self.page_size
        if ps == 1:
            return slots * self._rows_per_page
        if ps & (ps - 1) == 0:  # a shift is several times cheaper than an int64 division on CPU
            return slots + (slots >> (ps.bit_length() - 1)) * (self._rows_per_page - ps)
        return slots + torch.div(slots, ps, rounding_mode="floor") * (self._rows_per_page - ps)

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``/``v`` ``[T, num_kv_heads, head_dim]`` into token slots ``loc`` ``[T]``.
        No host synchronisation (CUDA-graph safe)."""
        self.set_kv_rows(layer_id, self.token_rows(loc.long()), k, v)

    def set_kv_rows(self, layer_id: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``set_kv`` by int64 ``token_rows`` (computed once per batch instead of once per layer)."""
        self._k_rows[layer_id].index_copy_(0, rows, k.to(self.dtype))
        self._v_rows[layer_id].index_copy_(0, rows, v.to(self.dtype))

    def gather_kv_rows(self, layer_id: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` ``[n, num_kv_heads, head_dim]`` (new tensors) of the 1-D ``token_rows`` ``rows``."""
        return self._k_rows[layer_id].index_select(0, rows), self._v_rows[layer_id].index_select(0, rows)

    def gather_kv(self, layer_id: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` ``[n, num_kv_heads, head_dim]`` (new tensors) of the 1-D token ``slots``."""
        return self.gather_kv_rows(layer_id, self.token_rows(slots))

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(k, v)`` ``[num_pages + 1, page_size, num_kv_heads, head_dim]`` of one layer,
        strided (not contiguous): slot ``s`` is ``k[s // page_size, s % page_size]``. K and V have
        the same strides; see ``kv_strides``."""
        return self._k[layer_id], self._v[layer_id]

    def kv_strides(self) -> tuple[int, int, int]:
        """Element strides ``(page, token, head)`` of the ``get_kv`` views (the head_dim stride is 1)."""
        s = self.buffer.stride()
        return s[0], s[3], s[4]
