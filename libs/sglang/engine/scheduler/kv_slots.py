"""Per-request KV bookkeeping on top of the page allocator and the request-to-token table.

A request owns whole pages; token ``j`` of a request lives in slot
``pages[j // page_size] * page_size + j % page_size``. When pages are granted, their slots are
written into the request's row of the req-to-token table, so backends read one dense row.
"""

from __future__ import annotations

import torch

from sglang.engine.memory import PageAllocator, ReqToTokenPool
from sglang.engine.scheduler.request import Request


class KVSlots:
    """Grants and takes back a request's pages and table row. Owned by the scheduler thread."""

    def __init__(self, allocator: PageAllocator, req_to_token: ReqToTokenPool) -> None:
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.page_size = allocator.page_size
        self.pages_in_use = 0

    def pages_needed(self, req: Request, upto_tokens: int) -> int:
        """Extra pages ``req`` needs to hold ``upto_tokens`` tokens."""
        return max(0, -(-upto_tokens // self.page_size) - len(req.pages))

    def grow(self, req: Request, upto_tokens: int) -> None:
        """Give ``req`` enough pages for ``upto_tokens`` tokens. Raises OutOfPagesError."""
        if upto_tokens > self.req_to_token.max_context_len:
            raise ValueError(f"{upto_tokens} tokens exceed the context length {self.req_to_token.max_context_len}")
        if req.row is None:
            req.row = self.req_to_token.alloc()
        n = self.pages_needed(req, upto_tokens)
        if n == 0:
            return
        new = self.allocator.alloc(n)
        start = len(req.pages) * self.page_size
        req.pages.extend(new)
        self.pages_in_use += n
        ps = self.page_size
        slots = (torch.tensor(new, dtype=torch.int64).unsqueeze(1) * ps + torch.arange(ps)).flatten()
        end = min(start + slots.numel(), self.req_to_token.max_context_len)
        self.req_to_token.write(req.row, start, slots[: end - start])

    def slots(self, req: Request, start: int, end: int) -> torch.Tensor:
        assert req.row is not None
        return self.req_to_token.table[req.row, start:end]

    def release(self, req: Request) -> None:
        """Free all of ``req``'s pages and its row; its KV is gone (``num_computed = 0``)."""
        if req.pages:
            self.allocator.free(req.pages)
            self.pages_in_use -= len(req.pages)
            req.pages = []
        if req.row is not None:
            self.req_to_token.free(req.row)
            req.row = None
        req.num_computed = 0

    def check_integrity(self, admitted: list[Request]) -> None:
        held = sum(len(r.pages) for r in admitted)
        if held != self.pages_in_use:
            raise AssertionError(f"requests hold {held} pages but {self.pages_in_use} are accounted in use")
        self.allocator.check_integrity(in_use=self.pages_in_use)
        rows = self.req_to_token.max_reqs - self.req_to_token.num_free
        with_row = sum(1 for r in admitted if r.row is not None)
        if rows != with_row:
            raise AssertionError(f"{rows} table rows in use but {with_row} requests hold one")
