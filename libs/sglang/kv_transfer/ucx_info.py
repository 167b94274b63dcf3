"""Which UCX transports actually carry the KV bytes, read from UCX's own protocol tables.

UCX prints, per endpoint configuration, the transport it selected for every operation when
``UCX_PROTO_INFO=y`` (e.g. ``remote memory write by ucp_put* from host memory to host ...
cma/memory``). Python cannot query an endpoint's lanes through NIXL, so the connector routes UCX's
log to a per-process file and parses those tables:

- ``enable_capture()`` sets ``UCX_LOG_FILE=<tmpdir>/ucx.%p.log`` and ``UCX_PROTO_INFO=y`` *before*
  the first NIXL agent loads UCX (UCX reads its log settings once, when it loads). It does nothing
  when the user set ``UCX_LOG_FILE`` or UCX is already loaded. Child processes inherit the
  variables and write their own file (``%p`` is the pid).
- ``UcxLogReader.poll()`` reads what was appended, forwards UCX's WARN/ERROR lines to Python
  logging (so nothing UCX says is lost by the redirect) and collects the selections.

The tables appear when an endpoint is first used, i.e. after the first transfer to a peer.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import re
import tempfile
import threading
import time

logger = logging.getLogger(__name__)

_MARK = "SGLANG_KV_UCX_LOG"  # the UCX_LOG_FILE pattern we set, inherited by children
_lock = threading.Lock()
_PREFIX = re.compile(r"^\[[^\]]*\]\s+\[[^\]]*\]\s?")
_LEVEL = re.compile(r"\bUCX\s+(ERROR|WARN|DIAG)\b")
_TITLE = re.compile(r"^(.+?) (\S+) cfg#\d+$")
_MEM = re.compile(r"from (\S+)(?: memory)?(?: to (\S+))?")  # "from host memory to cuda/dev[1]", "from cuda/GPU0 to ..."


def ucx_loaded() -> bool:
    """Whether libucs is mapped into this process (Linux); ``True`` when unknown."""
    try:
        with open("/proc/self/maps") as f:
            return any("libucs" in line for line in f)
    except OSError:
        return True


def enable_capture() -> str | None:
    """Route this process's UCX log to a file we parse; returns the file path or ``None``."""
    with _lock:
        pattern = os.environ.get("UCX_LOG_FILE")
        if pattern is not None:
            if os.environ.get(_MARK) != pattern:
                return None  # the user's own log file: leave it alone
            return pattern.replace("%p", str(os.getpid()))
        if ucx_loaded():
            return None
        tmp = tempfile.mkdtemp(prefix="sglang-ucx-")
        pattern = os.path.join(tmp, "ucx.%p.log")
        os.environ["UCX_LOG_FILE"] = pattern
        os.environ[_MARK] = pattern
        os.environ.setdefault("UCX_PROTO_INFO", "y")
        path = pattern.replace("%p", str(os.getpid()))
        atexit.register(_cleanup, path)
        return path


def _cleanup(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))  # only when the children's files are gone too


def ucx_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("UCX_")}


def _op_key(op: str, ep_kind: str) -> str:
    if op.startswith("remote memory write"):
        name = "put"
    elif op.startswith("remote memory read"):
        name = "get"
    elif op.startswith("active message"):
        name = "am"
    else:
        name = op.split(" by ")[0]
    m = _MEM.search(op)
    mem = "" if m is None else (_kind(m.group(1)) + (f"->{_kind(m.group(2))}" if m.group(2) else ""))
    return " ".join(p for p in (name, ep_kind, mem) if p)


def _kind(mem: str) -> str:
    """``cuda/GPU0`` -> ``cuda``, ``host`` -> ``host``."""
    return mem.split("/")[0]


def _flush_c_stdio() -> None:
    """UCX writes its log through C stdio, which buffers a file: ``fflush(NULL)`` pushes it out."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None)
        _libc.fflush(None)
    except (OSError, AttributeError):
        pass


_libc: ctypes.CDLL | None = None


class UcxLogReader:
    """Incremental reader of one UCX log file (see the module docstring)."""

    def __init__(self, path: str | None, worker: str, period_s: float = 1.0) -> None:
        self.path = path
        self.worker = worker
        self.period_s = period_s
        self.selected: dict[str, list[str]] = {}  # op key -> transports, in first-seen order
        self._offset = 0
        self._partial = ""
        self._next = 0.0
        self._table: tuple[str, str] | None = None  # (worker, ep kind)
        self._op: str | None = None

    @property
    def available(self) -> bool:
        return self.path is not None

    def poll(self, force: bool = False) -> list[str]:
        """Read new lines (at most once per ``period_s`` unless ``force``); returns the op keys
        whose selection grew."""
        now = time.monotonic()
        if self.path is None or (not force and now < self._next):
            return []
        self._next = now + self.period_s
        _flush_c_stdio()
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self._offset)
                data = f.read()
                self._offset = f.tell()
        except OSError:
            return []
        text = self._partial + data
        lines = text.split("\n")
        self._partial = lines.pop()
        changed: list[str] = []
        for line in lines:
            key = self._line(line)
            if key and key not in changed:
                changed.append(key)
        return changed

    def _line(self, line: str) -> str | None:
        level = _LEVEL.search(line)
        if level:
            msg = _PREFIX.sub("", line).strip()
            if level.group(1) == "ERROR":
                logger.error("UCX: %s", msg)
            else:
                logger.warning("UCX: %s", msg)
            return None
        rest = _PREFIX.sub("", line).strip()
        if not rest.startswith("|"):
            return None
        cells = [c.strip() for c in rest.strip("|").split("|")]
        if len(cells) == 1:
            title = _TITLE.match(cells[0])
            if title:
                self._table, self._op = (title.group(1), title.group(2)), None
            elif self._table is not None and self._op is None:
                self._op = cells[0]
            return None
        if len(cells) != 3 or self._table is None or self._op is None or cells[2] == "Config":
            return None
        worker, ep_kind = self._table
        if ep_kind == "self" or (worker != self.worker and self.worker):
            return None
        key = _op_key(self._op, ep_kind)
        got = self.selected.setdefault(key, [])
        if cells[2] and cells[2] not in got:
            got.append(cells[2])
            return key
        return None

    def remote_transports(self) -> dict[str, list[str]]:
        return {k: v for k, v in self.selected.items() if not k.startswith("am ")}

    def tcp_rma(self, src: str = "") -> list[str]:
        """Put/get operations to a peer that UCX runs over TCP; with ``src`` (``"cuda"``, ``"host"``)
        only those from that kind of memory. UCX prints tables for every memory-type pair it may
        meet (e.g. host -> cuda by software emulation over TCP), so only the pair whose source is
        the KV pool's memory says what the KV bytes use."""
        return [
            k for k, v in self.remote_transports().items()
            if any("tcp" in t for t in v) and (not src or f" {src}->" in k)
        ]
