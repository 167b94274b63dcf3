"""KV cache events: what the prefix cache stored or dropped, for cache-aware routing.

Modelled on the SGLang/vLLM event stream: ``BlockStored`` when the cache takes ownership of new
pages, ``BlockRemoved`` when it evicts them, ``AllBlocksCleared`` on flush. A consumer (the router's
approximate tree) identifies a page by its *chained page hash*, which is stable across processes and
machines, so two workers holding the same prefix report the same hashes.

Page hash (64-bit, unsigned, blake2b with ``digest_size=8``) over this byte encoding:

* first page of a sequence (no parent):  ``b"\\x00"`` + extra_key part
  where the extra_key part is ``b"\\x00"`` for ``None``, else ``b"\\x01"`` + ``len(utf8)`` as 4 bytes
  little-endian + the UTF-8 bytes;
* any later page:                         ``b"\\x01"`` + parent hash as 8 bytes little-endian;
* then, for every page: the number of tokens as 4 bytes little-endian, then each token id as
  8 bytes little-endian signed.

The digest read as a little-endian unsigned integer is the hash. The extra_key only enters the first
page; later pages inherit it through the chain.

Events travel in batches: a publisher stamps every batch with a monotonic ``seq`` (per publisher,
starting at 0) and a wall-clock ``ts``, like vLLM's ``EventBatch``.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sglang.utils.registry import LazyRegistry

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Chained page hashing
# --------------------------------------------------------------------------------------------------


def hash_page(parent_hash: int | None, token_ids: Sequence[int], extra_key: str | None = None) -> int:
    """Stable 64-bit hash of one page, chained from its parent page's hash.

    ``extra_key`` is used only when ``parent_hash`` is None (the first page of a sequence).
    """
    h = hashlib.blake2b(digest_size=8)
    if parent_hash is None:
        if extra_key is None:
            h.update(b"\x00\x00")
        else:
            raw = extra_key.encode("utf-8")
            h.update(b"\x00\x01" + len(raw).to_bytes(4, "little") + raw)
    else:
        h.update(b"\x01" + parent_hash.to_bytes(8, "little"))
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_pages(
    token_ids: Sequence[int],
    page_size: int,
    extra_key: str | None = None,
    parent_hash: int | None = None,
) -> list[int]:
    """Chained hashes of the whole pages of ``token_ids`` (a trailing partial page is ignored)."""
    hashes: list[int] = []
    prev = parent_hash
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        prev = hash_page(prev, token_ids[start : start + page_size], extra_key)
        hashes.append(prev)
    return hashes


# --------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVEvent:
    """Base of all KV cache events."""


@dataclass(frozen=True)
class BlockStored(KVEvent):
    """The cache took ownership of consecutive pages.

    ``block_hashes[i]`` is the hash of the page holding ``token_ids[i*block_size:(i+1)*block_size]``;
    ``parent_block_hash`` is the hash of the page just before the first of them (None at the root).
    """

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    extra_key: str | None = None


@dataclass(frozen=True)
class BlockRemoved(KVEvent):
    """The cache freed these pages (in eviction order: a page always after its descendants)."""

    block_hashes: list[int]


@dataclass(frozen=True)
class AllBlocksCleared(KVEvent):
    """The cache dropped everything (flush)."""


@dataclass(frozen=True)
class KVEventBatch:
    """Events published together, stamped by the publisher. Iterates over its events, so a
    subscriber may treat it as the list of events (``subscribe(seen.extend)``)."""

    seq: int
    ts: float
    events: list[KVEvent] = field(default_factory=list)

    def __iter__(self) -> Iterator[KVEvent]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


# --------------------------------------------------------------------------------------------------
# Publishers
# --------------------------------------------------------------------------------------------------


class KVEventPublisher(ABC):
    """Where the prefix cache sends its events.

    Contract: :meth:`publish` is called from the thread that owns the cache, after the cache's state
    already reflects the events; it must not call back into the cache and should not block for long.
    The events list is handed over (the cache keeps no reference to it).
    """

    @abstractmethod
    def publish(self, events: list[KVEvent]) -> None:
        """Publish one batch of events (an empty list is a no-op)."""

    def close(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release resources; publishing after close is undefined."""


Subscriber = Callable[[KVEventBatch], None]


class InProcessPublisher(KVEventPublisher):
    """Keeps the last ``maxlen`` batches in memory and calls subscribers synchronously.

    A subscriber that raises is logged and kept; it never breaks the cache operation that published.
    """

    def __init__(self, maxlen: int = 10_000) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self._batches: deque[KVEventBatch] = deque(maxlen=maxlen)
        self._subscribers: list[Subscriber] = []
        self._next_seq = 0

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` with every future batch; returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def publish(self, events: list[KVEvent]) -> None:
        if not events:
            return
        batch = KVEventBatch(seq=self._next_seq, ts=time.time(), events=list(events))
        self._next_seq += 1
        self._batches.append(batch)
        for callback in list(self._subscribers):
            try:
                callback(batch)
            except Exception:
                logger.exception("KV event subscriber %r failed on batch %d", callback, batch.seq)

    @property
    def batches(self) -> list[KVEventBatch]:
        """The retained batches, oldest first (a copy)."""
        return list(self._batches)

    @property
    def events(self) -> list[KVEvent]:
        """All retained events flattened, oldest first."""
        return [e for b in self._batches for e in b.events]

    def drain(self) -> list[KVEventBatch]:
        """Return the retained batches and forget them (seq keeps counting)."""
        out = list(self._batches)
        self._batches.clear()
        return out


_PUBLISHERS: LazyRegistry[KVEventPublisher] = LazyRegistry(
    "KV event publisher", {"in_process": "sglang.engine.prefix_cache.events:InProcessPublisher"}
)


def register_publisher(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:Class"`` (imported only when created)."""
    _PUBLISHERS.register(name, target)


def available_publishers() -> list[str]:
    return _PUBLISHERS.names()


def create_publisher(name: str, **kwargs: Any) -> KVEventPublisher:
    return _PUBLISHERS.create(name, **kwargs)
