"""``@sgl.function``: a program, run once (``run``), over many inputs (``run_batch``), or nested."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sglang.lang.backends.base import Backend
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import GenParams
from sglang.lang.state import ProgramState

AUTO_THREADS = 64
_default_backend: Backend | None = None


def as_backend(backend: Any) -> Backend:
    """A frontend backend from a Backend or an in-process ``sglang.Engine``."""
    if isinstance(backend, Backend):
        return backend
    if hasattr(backend, "generate") and hasattr(backend, "tokenizer") and hasattr(backend, "async_generate"):
        from sglang.lang.backends.engine import EngineBackend

        return EngineBackend(backend)
    raise TypeError(
        f"a backend must be sgl.RuntimeEndpoint, sgl.OpenAI, sgl.EngineBackend or a sglang.Engine, "
        f"got {type(backend).__name__}"
    )


def set_default_backend(backend: Any) -> None:
    """The backend programs use when ``run`` gets none (a Backend or a ``sglang.Engine``);
    ``None`` clears it."""
    global _default_backend
    _default_backend = None if backend is None else as_backend(backend)


def get_default_backend() -> Backend | None:
    return _default_backend


def _resolve_backend(backend: Any) -> Backend:
    if backend is not None:
        return as_backend(backend)
    if _default_backend is None:
        raise ValueError("no backend: pass backend=... or call sgl.set_default_backend(sgl.RuntimeEndpoint(url))")
    return _default_backend


class SglFunction:
    """A program: ``func(s, *args, **kwargs)`` that appends to ``s``."""

    def __init__(self, func: Callable[..., Any], bind_arguments: dict[str, Any] | None = None) -> None:
        params = list(inspect.signature(func).parameters)
        if not params:
            raise TypeError(f"@sgl.function {func.__name__} must take the program state as its first argument")
        self.func = func
        self.arg_names = params[1:]
        self.bind_arguments = dict(bind_arguments or {})
        functools.update_wrapper(self, func)

    def bind(self, **kwargs: Any) -> SglFunction:
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise TypeError(f"{self.func.__name__} has no arguments {unknown}; it takes {self.arg_names}")
        return SglFunction(self.func, {**self.bind_arguments, **kwargs})

    def run(self, *args: Any, max_new_tokens: int | None = None, stop: str | list[str] | None = None,
            stop_token_ids: list[int] | None = None, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
            presence_penalty: float | None = None, ignore_eos: bool | None = None, stream: bool = False,
            backend: Any = None, **kwargs: Any) -> ProgramState:
        """Run the program; sampling options here are the defaults of its ``gen`` calls. Returns the
        finished state, or at once with ``stream=True`` (read it with ``text_iter``)."""
        defaults = GenParams(max_new_tokens=max_new_tokens, stop=stop, stop_token_ids=stop_token_ids,
                             temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                             frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                             ignore_eos=ignore_eos)
        return self._run(_resolve_backend(backend), args, {**self.bind_arguments, **kwargs}, defaults, stream)

    def _run(self, backend: Backend, args: Sequence[Any], kwargs: dict[str, Any], defaults: GenParams,
             stream: bool) -> ProgramState:
        executor = StreamExecutor(backend, defaults, stream)
        state = ProgramState(executor)

        def body() -> None:
            try:
                state.ret_value = self.func(state, *args, **kwargs)
            except BaseException as e:
                executor.fail(e)
                raise
            finally:
                executor.end()

        if stream:
            def quiet() -> None:
                with contextlib.suppress(BaseException):  # recorded in the state, raised to its reader
                    body()

            threading.Thread(target=quiet, name=f"sgl-program-{self.func.__name__}", daemon=True).start()
            return state
        body()
        executor.sync()
        return state

    def run_batch(self, batch_kwargs: Sequence[dict[str, Any]], *, num_threads: int | str = "auto",
                  progress_bar: bool = False, backend: Any = None, **sampling: Any) -> list[ProgramState]:
        """Run the program once per dict of arguments, ``num_threads`` at a time ("auto": up to 64);
        the states come back in input order. The first program error is raised."""
        if isinstance(batch_kwargs, dict) or not all(isinstance(k, dict) for k in batch_kwargs):
            raise TypeError("run_batch takes a list of dicts of program arguments")
        items = list(batch_kwargs)
        if not items:
            return []
        if num_threads == "auto":
            threads = min(len(items), AUTO_THREADS)
        elif isinstance(num_threads, int) and not isinstance(num_threads, bool) and num_threads >= 1:
            threads = num_threads
        else:
            raise ValueError(f"num_threads must be 'auto' or a positive int, got {num_threads!r}")
        be = _resolve_backend(backend)
        bar = None
        if progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc=self.func.__name__)

        def one(kw: dict[str, Any]) -> ProgramState:
            try:
                return self.run(backend=be, **sampling, **kw)
            finally:
                if bar is not None:
                    bar.update(1)

        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sgl-batch") as pool:
                return list(pool.map(one, items))
        finally:
            if bar is not None:
                bar.close()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Inside another program (first argument a state): run this one on that state. Otherwise
        the same as ``run``."""
        if args and isinstance(args[0], ProgramState):
            return self.func(*args, **{**self.bind_arguments, **kwargs})
        return self.run(*args, **kwargs)


def function(func: Callable[..., Any] | None = None) -> Any:
    """``@sgl.function`` (also ``@sgl.function()``)."""
    if func is None:
        return function
    return SglFunction(func)
