"""Per-request KV bookkeeping over the page allocator, the req-to-token table and the prefix cache.

A request's ``pages`` cover its tokens in order; token ``j`` lives in slot
``pages[j // page_size] * page_size + j % page_size``. The first ``num_tree_pages`` of them belong
to the prefix cache and are pinned by the lock on ``req.tree_node``; the rest are the request's own
("in use"). Invariant: allocator free + in use + cached == total pages, where "in use" is the
requests' own pages plus *quarantined* ones: pages of a finished decode-side request that a remote
prefill may still write into (PD), held until the connector says they are safe to reuse. They
count as used (``pages_in_use``, the ``num_used_pages`` stat) but belong to no request.

When pages run short, unlocked cached pages are evicted before anyone is retracted.
"""

from __future__ import annotations

import torch

from sglang.engine.memory import OutOfPagesError, PageAllocator, ReqToTokenPool
from sglang.engine.prefix_cache import RadixCache
from sglang.engine.scheduler.request import Request


class KVSlots:
    """Grants and takes back a request's pages and table row. Owned by the scheduler thread."""

    def __init__(self, allocator: PageAllocator, req_to_token: ReqToTokenPool, cache: RadixCache | None) -> None:
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.cache = cache
        self.page_size = allocator.page_size
        self.pages_in_use = 0  # pages owned by requests (not by the cache), quarantined ones included
        self.quarantined = 0  # of those, pages taken off finished requests (see ``quarantine``)

    # ---- capacity ------------------------------------------------------------------------
    def pages_needed(self, req: Request, upto_tokens: int) -> int:
        """Extra pages ``req`` needs to hold ``upto_tokens`` tokens."""
        return max(0, -(-upto_tokens // self.page_size) - len(req.pages))

    @property
    def available_pages(self) -> int:
        """Free pages plus cached pages that eviction could free now."""
        evictable = self.cache.num_evictable_pages if self.cache is not None else 0
        return self.allocator.num_free + evictable

    def _alloc(self, n: int) -> list[int]:
        short = n - self.allocator.num_free
        if short > 0 and self.cache is not None:
            self.cache.evict(short)
        return self.allocator.alloc(n)  # raises OutOfPagesError

    # ---- prefix reuse ----------------------------------------------------------------------
    def match_len(self, req: Request) -> int:
        """Tokens of ``req`` the cache could serve now (at least one token is left to compute)."""
        if self.cache is None:
            return 0
        # Read-only: ranking and peeking must not count as cache hits or reorder eviction.
        return self.cache.peek_prefix_len(self._matchable(req), req.extra_key)

    @staticmethod
    def _matchable(req: Request) -> list[int]:
        """Tokens the cache may serve: all but the last known one, and none at or after the first
        prompt position whose logits the request still needs for its prompt logprobs."""
        end = req.num_known - 1
        if req.wants_prompt_logprobs:
            end = min(end, req.prompt_logprobs_done - 1)
        return req.tokens(0, end)

    def attach_prefix(self, req: Request) -> int:
        """Pin the longest cached prefix of a request that holds no KV; returns its token count."""
        assert not req.pages and req.num_computed == 0
        if self.cache is None:
            return 0
        m = self.cache.match_prefix(self._matchable(req), req.extra_key)
        if not m.pages:
            return 0
        self.cache.lock(m.node)
        req.tree_node = m.node
        if req.row is None:
            req.row = self.req_to_token.alloc()
        req.pages = list(m.pages)
        req.num_tree_pages = len(m.pages)
        self._write_pages(req, 0, m.pages)
        req.num_computed = m.num_tokens
        return m.num_tokens

    def cache_computed(self, req: Request) -> None:
        """Hand the whole pages computed so far to the cache (in-flight and finished requests).

        Where the cache already held the same content, the request switches to the cache's pages
        and frees its duplicates, so concurrent requests converge on one copy.
        """
        if self.cache is None or req.row is None:
            return
        full = req.num_computed // self.page_size
        have = req.num_tree_pages
        if full <= have:
            return
        # Only the pages past the locked node (which ends at page ``have``): the tree walks from there.
        ps = self.page_size
        res = self.cache.insert(req.tokens(have * ps, full * ps), req.pages[have:full], req.extra_key, after=req.tree_node)
        if res.duplicate_pages:
            self.allocator.free(res.duplicate_pages)
        # Pages that changed hands: from own to the cache's (taken or swapped for the cache's copy).
        self.pages_in_use -= full - have
        if res.pages != req.pages[have:full]:
            self._write_pages(req, have, res.pages)
            req.pages[have:full] = res.pages
        self.cache.lock(res.node)
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        req.tree_node = res.node
        req.num_tree_pages = full

    # ---- growth and release ----------------------------------------------------------------
    def grow(self, req: Request, upto_tokens: int) -> None:
        """Give ``req`` enough pages for ``upto_tokens`` tokens (evicting cached pages if needed).
        Raises OutOfPagesError when even eviction cannot make room."""
        if upto_tokens > self.req_to_token.max_context_len:
            raise ValueError(f"{upto_tokens} tokens exceed the context length {self.req_to_token.max_context_len}")
        n = self.pages_needed(req, upto_tokens)
        if req.row is None:
            if self.req_to_token.num_free == 0:
                raise OutOfPagesError("no free request rows")
            req.row = self.req_to_token.alloc()
        if n == 0:
            return
        new = self._alloc(n)
        start = len(req.pages)
        req.pages.extend(new)
        self.pages_in_use += n
        self._write_pages(req, start, new)

    def _write_pages(self, req: Request, first_page: int, pages: list[int]) -> None:
        assert req.row is not None
        ps = self.page_size
        start = first_page * ps
        n = min(len(pages) * ps, self.req_to_token.max_context_len - start)
        slots = [p * ps + i for p in pages for i in range(ps)] if ps > 1 else list(pages)
        self.req_to_token.write(req.row, start, slots[:n])

    def slots(self, req: Request, start: int, end: int) -> torch.Tensor:
        assert req.row is not None
        return self.req_to_token.table[req.row, start:end]

    def slot(self, req: Request, pos: int) -> int:
        """The KV slot of ``req``'s token ``pos``, from its page list on the host: the same value
        as ``slots(req, pos, pos + 1)`` (the table row is written from ``req.pages``), without a
        device tensor per request (a decode batch of 256 built 256 slices and a cat: ~3 ms)."""
        return req.pages[pos // self.page_size] * self.page_size + pos % self.page_size

    def release(self, req: Request, keep_in_cache: bool = True) -> None:
        """Drop ``req``'s KV: whole computed pages go to the cache (when enabled and asked), the
        rest are freed, the lock and the row are released, and ``num_computed`` becomes 0."""
        if keep_in_cache:
            self.cache_computed(req)
        own = req.pages[req.num_tree_pages :]
        if own:
            self.allocator.free(own)
            self.pages_in_use -= len(own)
        if req.tree_node is not None and self.cache is not None:
            self.cache.unlock(req.tree_node)
        req.tree_node = None
        req.pages = []
        req.num_tree_pages = 0
        if req.row is not None:
            self.req_to_token.free(req.row)
            req.row = None
        req.num_computed = 0

    def quarantine(self, req: Request) -> list[int]:
        """Take ``req``'s own pages away before it is released, keeping them out of the free list
        (still counted in use) until ``free_quarantined``; returns them."""
        pages = req.pages[req.num_tree_pages :]
        del req.pages[req.num_tree_pages :]
        self.quarantined += len(pages)
        return pages

    def free_quarantined(self, pages: list[int]) -> None:
        self.allocator.free(pages)
        self.quarantined -= len(pages)
        self.pages_in_use -= len(pages)

    def check_integrity(self, admitted: list[Request]) -> None:
        held = sum(len(r.pages) - r.num_tree_pages for r in admitted)
        if held + self.quarantined != self.pages_in_use:
            raise AssertionError(
                f"requests own {held} pages and {self.quarantined} are quarantined, but {self.pages_in_use} "
                "are accounted in use"
            )
        cached = 0
        if self.cache is not None:
            self.cache.check_integrity()
            cached = self.cache.num_cached_pages
        self.allocator.check_integrity(in_use=self.pages_in_use, cached=cached)
        rows = self.req_to_token.max_reqs - self.req_to_token.num_free
        with_row = sum(1 for r in admitted if r.row is not None)
        if rows != with_row:
            raise AssertionError(f"{rows} table rows in use but {with_row} requests hold one")
