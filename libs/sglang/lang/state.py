"""``s`` inside a program: the handle over one stream executor, and the group of its forks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import Join, to_expr

JOIN_MODES = ("gather_variable", "concate_join")


class ProgramState:
    """What a program appends to and reads from.

    ``s += expr`` queues and returns; ``s["x"]`` waits for variable ``x``; ``s.text()`` and
    ``s.messages()`` wait for everything queued so far.
    """

    def __init__(self, executor: StreamExecutor) -> None:
        self.stream_executor = executor
        self.ret_value: Any = None

    def __iadd__(self, other: Any) -> ProgramState:
        self.stream_executor.submit(to_expr(other))
        return self

    def __getitem__(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        ex = self.stream_executor
        return name in ex.variables or name in ex.own_vars

    def text(self) -> str:
        self.stream_executor.sync()
        return self.stream_executor.text_

    def messages(self) -> list[dict[str, Any]]:
        self.stream_executor.sync()
        return [dict(m) for m in self.stream_executor.messages_]

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """``meta_info`` of the gen/select that set ``name``: ``prompt_tokens``,
        ``completion_tokens``, ``cached_tokens``, ``finish_reason`` (and per-choice details for a
        select)."""
        self.get_var(name)
        return dict(self.stream_executor.meta_info.get(name, {}))

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        return self.stream_executor.error

    def fork(self, size: int = 1) -> ForkGroup:
        """``size`` copies of this state; each runs its own calls in parallel with the others."""
        return ForkGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    # ------------------------------------------------------------------ streaming

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Text as it is produced: everything (``var_name`` None) or the pieces of one variable,
        ending when that variable is complete. Raises the program's error at the end, if any."""
        ex = self.stream_executor
        seen = 0
        while True:
            pieces, done = ex.pieces_from(seen)
            seen += len(pieces)
            for var, text, var_done in pieces:
                if var_name is None or var == var_name:
                    if text:
                        yield text
                    if var_done and var == var_name:
                        return
            if done and not pieces:
                ex.raise_error()
                if var_name is not None:
                    ex.get_var(var_name)  # a name the program never set: KeyError naming it
                return

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        """``text_iter`` for asyncio (the waiting happens in the default thread pool)."""
        loop = asyncio.get_running_loop()
        it = self.text_iter(var_name)
        end = object()
        while True:
            piece = await loop.run_in_executor(None, next, it, end)
            if not isinstance(piece, str):
                return
            yield piece

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ForkGroup:
    """The forks of one state: index them, iterate them, ``+=`` to all (or one item each), and
    ``join()`` them back into the parent."""

    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        self.states = states
        self.parent = parent

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ForkGroup:
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} expressions for {len(self.states)} forks")
            for s, x in zip(self.states, other, strict=True):
                s += x
        else:
            for s in self.states:
                s += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Fold the forks back into the parent (queued, non-blocking). Every variable a fork set
        becomes, in the parent, the list of the forks' values; ``concate_join`` also appends each
        fork's new text to the parent's text."""
        if mode not in JOIN_MODES:
            raise ValueError(f"join mode must be one of {JOIN_MODES}, got {mode!r}")
        self.parent.stream_executor.submit(Join([s.stream_executor for s in self.states], mode))
