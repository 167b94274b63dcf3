"""KV memory: page allocator, paged KV pool, request-to-token table."""

from __future__ import annotations

from sglang.engine.memory.kv_pool import KVPool
from sglang.engine.memory.page_allocator import OutOfPagesError, PageAllocator
from sglang.engine.memory.req_to_token import ReqToTokenPool

__all__ = ["KVPool", "OutOfPagesError", "PageAllocator", "ReqToTokenPool"]
