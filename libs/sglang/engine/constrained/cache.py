"""Compiled grammars, once per ``(kind, spec)``, shared by every request that asks for them.

``GrammarCache.get`` runs on the caller's thread (the engine validates requests there), never on
the scheduler thread. The backend is built on the first call (tokenizer info costs 0.1-0.5 s for a
100k+ vocabulary, so engines that never see a grammar never pay it). Concurrent callers of one key
wait for a single compile; a failed compile is not cached (the next request compiles again and gets
the same error).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

from sglang.engine.constrained.base import GRAMMAR_KINDS, CompiledGrammar, GrammarBackend

DEFAULT_MAX_ENTRIES = 512


class GrammarCache:
    """Thread-safe LRU of compiled grammars over a lazily built backend.

    ``backend_factory`` is called once (under a lock) on the first ``get``; if it raises, the error
    goes to that caller with the parameter's name in front, and the next call tries again.
    """

    def __init__(
        self, backend_factory: Callable[[], GrammarBackend], max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        self._factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._max = max_entries
        self._lock = threading.Lock()
        self._backend_lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Future[CompiledGrammar]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def backend(self) -> GrammarBackend | None:
        """The backend, or None while no grammar was requested yet."""
        return self._backend

    def _get_backend(self, kind: str) -> GrammarBackend:
        with self._backend_lock:
            if self._backend is None:
                try:
                    self._backend = self._factory()
                except ValueError as e:
                    raise type(e)(f"{kind}: {e}") from None
            return self._backend

    def get(self, kind: str, spec: str) -> CompiledGrammar:
        """The compiled grammar for ``spec``: the same object for the same key while cached.
        Raises ``ValueError`` naming ``kind`` when the spec is invalid or no backend is available."""
        if kind not in GRAMMAR_KINDS:
            raise ValueError(f"unknown grammar kind {kind!r}; choose one of {', '.join(GRAMMAR_KINDS)}")
        backend = self._get_backend(kind)
        key = (kind, spec)
        with self._lock:
            fut = self._entries.get(key)
            if fut is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                owner = False
            else:
                fut = Future()
                self._entries[key] = fut
                self.misses += 1
                owner = True
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        if owner:
            try:
                fut.set_result(backend.compile(kind, spec))
            except BaseException as e:
                with self._lock:
                    if self._entries.get(key) is fut:
                        del self._entries[key]
                fut.set_exception(e)
        return fut.result()

    def __len__(self) -> int:
        return len(self._entries)
