"""Page allocator: a free list over KV pages.

Page 0 is reserved as a padding page (writes of padded tokens land there), so usable pages are
``1..num_pages``. A token's KV slot is ``page * page_size + offset``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class OutOfPagesError(RuntimeError):
    """Raised when an allocation cannot be satisfied; the caller retracts or waits."""


class PageAllocator:
    """Hands out and takes back page ids. Not thread-safe: the scheduler thread owns it.

    Contract: every page id returned by :meth:`alloc` must come back exactly once through
    :meth:`free` (or be handed to the prefix cache, which then accounts for it as cached).
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(1, num_pages + 1))
        self._free_set: set[int] = set(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Take ``n`` pages (lowest recently freed order: FIFO). Raises OutOfPagesError."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        self._free_set.difference_update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages. Freeing a page twice or a page out of range is a bug and raises."""
        for p in pages:
            if not 1 <= p <= self.num_pages:
                raise ValueError(f"page {p} out of range 1..{self.num_pages}")
            if p in self._free_set:
                raise ValueError(f"double free of page {p}")
            self._free_set.add(p)
            self._free.append(p)

    def check_integrity(self, in_use: int, cached: int = 0) -> None:
        """Assert free + in use + cached == total. ``in_use`` and ``cached`` come from the owners."""
        free = len(self._free)
        if len(self._free_set) != free:
            raise AssertionError(f"free list has duplicates: {free} entries, {len(self._free_set)} unique")
        if free + in_use + cached != self.num_pages:
            raise AssertionError(
                f"page leak: free {free} + in use {in_use} + cached {cached} != total {self.num_pages}"
            )
