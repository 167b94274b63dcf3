"""The models the router serves: name, tokenizer, context length and vocabulary, per served model.

A model becomes known when its first worker joins the registry: the router asks that worker for
``GetModelInfo`` and loads the tokenizer from ``settings.tokenizer_path``, else
``settings.model_path``, else the ``model_path`` the worker reports (the router must see the same
files: one machine, or a shared volume). Loading runs in a thread (transformers takes seconds to
import) in one kept task per model; requests for a model still loading wait for it.

Clients may name a model by its served name (the registry's ``model``), by the worker's
``model_path`` or by that path's base name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from sglang.engine.tokenizer import Tokenizer
from sglang.settings.router import RouterSettings
from sglang.transport.types import WorkerUnavailable

from sglang_router.discovery import Discovery, WorkerHandle
from sglang_router.errors import RouterError

logger = logging.getLogger(__name__)

RETRY_LOAD_AFTER_S = 2.0


class UnknownModel(LookupError):
    """No worker serves the model the request names (``transient``: nothing is served right now)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient

    def error(self, retry_after: int) -> RouterError:
        """400 ``model_not_found`` for a name nobody serves; 503 while no worker serves anything."""
        if self.transient:
            return RouterError(503, self.message, code="no_workers", retry_after=retry_after)
        return RouterError(400, self.message, param="model", code="model_not_found")


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a failed load's exception as seen (it is logged, and retried on the next request)."""
    if not task.cancelled():
        task.exception()


@dataclass
class ModelState:
    name: str
    tokenizer: Tokenizer
    context_length: int
    vocab_size: int
    model_path: str
    info: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


class ModelCatalog:
    """Served models and their tokenizers.

    Contract: ``get(name)`` returns the loaded :class:`ModelState` (waiting up to ``timeout_s`` for a
    load in progress) or raises :class:`RouterError`: 400 ``model_not_found`` when no worker serves
    ``name``, 503 while no worker serves anything (``None`` or ``""``: the only model, or the first by
    name). ``close()`` cancels and awaits load tasks.
    """

    def __init__(self, settings: RouterSettings, discovery: Discovery) -> None:
        self.settings = settings
        self.discovery = discovery
        self.states: dict[str, ModelState] = {}
        self._loading: dict[str, asyncio.Task[ModelState]] = {}
        self._tokenizers: dict[str, asyncio.Task[Tokenizer]] = {}  # by path, shared by models
        self._failed_at: dict[str, float] = {}  # model -> monotonic time of its last failed load
        discovery.on_added.append(self.on_worker_added)

    # ------------------------------------------------------------------ loading

    def preload(self) -> None:
        """Start loading the configured tokenizer now (before any worker joins)."""
        path = self.settings.tokenizer_path or self.settings.model_path
        if path:
            self._tokenizer_task(path)

    def on_worker_added(self, handle: WorkerHandle) -> None:
        name = handle.record.model
        if name not in self.states and name not in self._loading:
            task = asyncio.create_task(self._load(name, handle), name=f"load-model-{name}")
            task.add_done_callback(_retrieve)
            self._loading[name] = task

    def _tokenizer_task(self, path: str) -> asyncio.Task[Tokenizer]:
        task = self._tokenizers.get(path)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.create_task(asyncio.to_thread(Tokenizer.from_pretrained, path), name=f"tokenizer-{path}")
            task.add_done_callback(_retrieve)
            self._tokenizers[path] = task
        return task

    async def _load(self, name: str, handle: WorkerHandle) -> ModelState:
        try:
            info: dict[str, Any] = await handle.client.get_model_info()
            path = self.settings.tokenizer_path or self.settings.model_path or info.get("model_path") or ""
            if not path:
                raise RuntimeError(f"worker {handle.worker_id} reports no model_path; start the router with --tokenizer-path")
            tokenizer = await self._tokenizer_task(path)
            ctx = int(info.get("context_length") or handle.record.context_length or 0)
            vocab = int(info.get("vocab_size") or tokenizer.vocab_size)
            state = ModelState(name, tokenizer, ctx, vocab, str(info.get("model_path") or path), info)
            self.states[name] = state
            logger.info("model %r ready: tokenizer %s, context %d, vocab %d", name, path, ctx, vocab)
            return state
        except Exception as e:
            logger.warning("loading model %r from worker %s failed: %s", name, handle.worker_id, e)
            self._failed_at[name] = time.monotonic()
            if isinstance(e, WorkerUnavailable):
                self.discovery.mark_failed(handle.worker_id)  # the next try asks another worker
            raise
        finally:
            self._loading.pop(name, None)

    def ensure_loading(self) -> None:
        """Start loading every served model that is neither loaded nor loading (a failed load is
        retried after ``RETRY_LOAD_AFTER_S``). Called periodically, so readiness recovers by itself."""
        now = time.monotonic()
        for name in self.served_names():
            if name in self.states or name in self._loading:
                continue
            if now - self._failed_at.get(name, -RETRY_LOAD_AFTER_S) < RETRY_LOAD_AFTER_S:
                continue
            workers = self.discovery.routable(name)
            if workers:
                self.on_worker_added(workers[0])

    async def close(self) -> None:
        tasks: list[asyncio.Task[Any]] = [*self._loading.values(), *self._tokenizers.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self._loading.clear()
        self._tokenizers.clear()

    # ------------------------------------------------------------------ lookup

    def served_names(self) -> list[str]:
        """Names with at least one routable worker, sorted."""
        return sorted({h.record.model for h in self.discovery.routable()})

    def resolve(self, name: str | None) -> str:
        """The served name that ``name`` refers to; raises :class:`UnknownModel`."""
        names = self.served_names()
        if not name:
            if not names:
                raise UnknownModel("no worker is available right now; retry later", transient=True)
            return names[0]
        if name in names:
            return name
        for h in self.discovery.routable():
            path = h.record.model_path.rstrip("/")
            if name in (path, os.path.basename(path)):
                return h.record.model
        for served, state in self.states.items():
            if served in names and name == state.info.get("served_model_name"):
                return served
        if not names:
            raise UnknownModel("no worker is available right now; retry later", transient=True)
        raise UnknownModel(f"the model {name!r} does not exist; served: {', '.join(names)}")

    async def get(self, name: str | None, timeout_s: float = 60.0) -> ModelState:
        try:
            served = self.resolve(name)
        except UnknownModel as e:
            raise e.error(self.settings.retry_after_s) from None
        state = self.states.get(served)
        if state is not None:
            return state
        task = self._loading.get(served)
        if task is None:  # never loaded, or the last try failed: try again with a live worker
            self.on_worker_added(self.discovery.routable(served)[0])  # resolve() saw one
            task = self._loading[served]
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancel on 3.11
                return await asyncio.shield(task)
        except Exception as e:
            raise RouterError(
                503, f"the tokenizer of {served!r} is not loaded: {e}", code="model_loading",
                retry_after=self.settings.retry_after_s,
            ) from None

    @property
    def ready(self) -> bool:
        """At least one served model is loaded and has a routable worker."""
        return any(n in self.states for n in self.served_names())
