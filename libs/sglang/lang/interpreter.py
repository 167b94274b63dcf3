"""The stream executor: one thread per program state runs its expressions in order.

``s += expr`` only queues ``expr`` and returns, so a program issues its calls without waiting; the
caller blocks only where it reads a value (``s["x"]``, ``s.text()``) or forks. Forks get their own
executors and threads, so their ``gen`` calls reach the backend at the same time (and share the
parent's prefix in the radix cache). An error stops the executor: later expressions are skipped
and the error is raised to whoever waits on the state.

Streaming: every piece of text appended is logged as ``(variable or None, text)``; ``text_iter``
readers follow the log under a condition variable.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from sglang.lang.backends.base import Backend, GenInput
from sglang.lang.choices import check_choices
from sglang.lang.ir import Expr, Gen, GenParams, Image, Join, RoleBegin, RoleEnd, Select, Text, flatten

_END = object()


class StreamExecutor:
    def __init__(self, backend: Backend, default_params: GenParams, stream: bool = False) -> None:
        self.backend = backend
        self.default_params = default_params
        self.stream = stream
        self.text_ = ""
        self.messages_: list[dict[str, Any]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, dict[str, Any]] = {}
        self.cur_role: str | None = None
        self.cur_role_begin = 0
        self.sent_upto = 0  # length of text_ the backend has last been sent (its cache has it)
        self.error: BaseException | None = None
        self.own_vars: set[str] = set()  # names set by expressions submitted to this executor
        self._events: dict[str, threading.Event] = {}  # name -> event of its latest submission
        self._expr_events: dict[int, threading.Event] = {}
        self._pieces: list[tuple[str | None, str, bool]] = []  # (variable, text, variable done)
        self._cond = threading.Condition()
        self.finished = False
        self.children: list[StreamExecutor] = []
        self.fork_pos = 0  # length of the parent's text when this executor was forked from it
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sgl-executor", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side

    def submit(self, expr: Expr) -> None:
        if self.finished:
            raise RuntimeError("this program state has ended; it takes no more expressions")
        for e in flatten(expr):
            if isinstance(e, (Gen, Select)) and e.name is not None:
                ev = threading.Event()
                self._events[e.name] = ev
                self._expr_events[id(e)] = ev
                self.own_vars.add(e.name)
            elif isinstance(e, Join):
                for name in sorted({n for f in e.forks for n in f.own_vars}):
                    ev = threading.Event()
                    self._events[name] = ev
                    self._expr_events[id(e), name] = ev  # type: ignore[index]
                    self.own_vars.add(name)
            self._queue.put(e)

    def sync(self) -> None:
        """Wait until every queued expression ran; raise the executor's error if any."""
        self._queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def get_var(self, name: str) -> Any:
        ev = self._events.get(name)
        if ev is None:
            if name in self.variables:
                return self.variables[name]
            known = sorted(set(self._events) | set(self.variables))
            raise KeyError(f"no variable {name!r} in this program state; known variables: {known}")
        ev.wait()
        self.raise_error()
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        self.sync()
        self.variables[name] = value
        self._events.pop(name, None)

    def end(self) -> None:
        """No more expressions: the thread exits once the queue is empty (forks end too)."""
        if not self.finished:
            self.finished = True
            self._queue.put(_END)
        for child in self.children:
            child.end()

    def fail(self, error: BaseException) -> None:
        self._queue.put(_Fail(error))

    def fork(self, n: int) -> list[StreamExecutor]:
        """``n`` copies of this state at this point (waits for the queue first). Caches the prefix
        once in the backend when several forks will continue it."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"fork needs a positive number of branches, got {n!r}")
        self.sync()
        if n > 1 and len(self.text_) > self.sent_upto:
            self.backend.cache_prefix(self.text_)
            self.sent_upto = len(self.text_)
        forks = []
        for _ in range(n):
            f = StreamExecutor(self.backend, self.default_params, self.stream)
            f.text_, f.messages_ = self.text_, [dict(m) for m in self.messages_]
            f.variables, f.meta_info = dict(self.variables), dict(self.meta_info)
            f.cur_role, f.cur_role_begin, f.sent_upto = self.cur_role, self.cur_role_begin, self.sent_upto
            f.fork_pos = len(self.text_)
            forks.append(f)
        self.children.extend(forks)
        return forks

    # ------------------------------------------------------------------ streaming log

    def pieces_from(self, start: int, timeout: float | None = None) -> tuple[list[tuple[str | None, str, bool]], bool]:
        """(log entries from ``start``, whether the state has finished); waits for something new."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._pieces) > start or self._done(), timeout)
            return self._pieces[start:], self._done()

    def _done(self) -> bool:
        return self.error is not None or (self.finished and self._queue.unfinished_tasks == 0)

    def _log(self, var: str | None, text: str, done: bool = False) -> None:
        with self._cond:
            self._pieces.append((var, text, done))
            self._cond.notify_all()

    def _append(self, text: str, var: str | None = None) -> None:
        self.text_ += text
        if text:
            self._log(var, text)

    # ------------------------------------------------------------------ executor thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _END:
                    return
                if isinstance(item, _Fail):
                    self.error = self.error or item.error
                elif self.error is None:
                    self._execute(item)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the state
                self.error = e
            finally:
                if self.error is not None:
                    for ev in self._events.values():
                        ev.set()
                self._queue.task_done()
                with self._cond:
                    self._cond.notify_all()

    def _execute(self, e: Expr) -> None:
        if isinstance(e, Text):
            self._append(e.value)
        elif isinstance(e, Gen):
            self._gen(e)
        elif isinstance(e, Select):
            self._select(e)
        elif isinstance(e, RoleBegin):
            self._role_begin(e.role)
        elif isinstance(e, RoleEnd):
            self._role_end(e.role)
        elif isinstance(e, Image):
            if not self.backend.supports_images():
                raise ValueError(
                    f"this model has no vision encoder; sgl.image needs a vision-language model "
                    f"({self.backend.model_name} is text-only)"
                )
            raise NotImplementedError("images are not supported by the frontend language yet")
        elif isinstance(e, Join):
            self._join(e)
        else:
            raise TypeError(f"unknown expression {type(e).__name__}")

    def _input(self) -> GenInput:
        role_text = self.text_[self.cur_role_begin:] if self.cur_role is not None else ""
        return GenInput(self.text_, [dict(m) for m in self.messages_], self.cur_role, role_text)

    def _set(self, key: Any, name: str | None, value: Any, meta: dict[str, Any]) -> None:
        if name is not None:
            self.variables[name] = value
            self.meta_info[name] = meta
            self._log(name, "", True)
        ev = self._expr_events.pop(key, None)
        if ev is not None:
            ev.set()

    def _gen(self, e: Gen) -> None:
        params = e.params.resolved(self.default_params)
        roles = self.backend.chat_roles()
        if self.cur_role == "assistant" and params.stop_token_ids is None and roles and roles.get("stop_token_ids"):
            params.stop_token_ids = list(roles["stop_token_ids"])
        inp = self._input()
        if self.stream:
            out, meta = "", dict[str, Any]()
            for piece, m in self.backend.generate_stream(inp, params):
                out += piece
                self._append(piece, e.name)
                meta = m if m is not None else meta
        else:
            out, meta = self.backend.generate(inp, params)
            self._append(out, e.name)
        self.sent_upto = len(self.text_)
        self._set(id(e), e.name, out, meta)

    def _select(self, e: Select) -> None:
        choices = check_choices(e.choices)
        decision = self.backend.select(self._input(), choices, e.temperature)
        self._append(decision.choice, e.name)
        self.sent_upto = len(self.text_) - len(decision.choice)
        self._set(id(e), e.name, decision.choice, decision.meta_info)

    def _roles(self, role: str) -> list[str]:
        roles = self.backend.chat_roles()
        if roles is None:
            raise ValueError(
                f"the model {self.backend.model_name} has no chat template; sgl.{role}() needs one "
                "(or write the prompt text yourself)"
            )
        if role not in roles:
            raise ValueError(f"the chat template of {self.backend.model_name} has no {role!r} role")
        return list(roles[role])

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(f"sgl.{role}_begin() inside an open {self.cur_role!r} turn; end that turn first")
        self._append(self._roles(role)[0])
        self.cur_role, self.cur_role_begin = role, len(self.text_)

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"sgl.{role}_end() without a matching sgl.{role}_begin() (open turn: {self.cur_role})")
        self.messages_.append({"role": role, "content": self.text_[self.cur_role_begin:]})
        self.cur_role = None
        self._append(self._roles(role)[1])

    def _join(self, e: Join) -> None:
        for f in e.forks:
            f.sync()
        if e.mode == "concate_join":
            for f in e.forks:
                self._append(f.text_[f.fork_pos:])
        for name in sorted({n for f in e.forks for n in f.own_vars}):
            self._set((id(e), name), name, [f.variables.get(name) for f in e.forks], {})


class _Fail:
    def __init__(self, error: BaseException) -> None:
        self.error = error
