"""KV connector interface: the prefill side writes a request's KV pages into the decode side's.

Vocabulary. A *room* (SGLang's ``bootstrap_room``, a random 63-bit id drawn by the router) pairs
one request's prefill half with its decode half. The decode worker reserves pages for the prompt
and *publishes* them for the room (``KVReceiver.publish``); the prefill worker looks the
destination up (``KVSender.dest``), then after every prefill chunk *sends* the pages that chunk
completed (``KVSender.send``), the first token and its logprob riding along with the last chunk
as ``aux``. Both sides learn the outcome by *polling* from the scheduler thread; nothing here
blocks on a peer, and every wait has a timeout.

Pages are ``KVPool`` pages. The pool is page-major (``memory_layout`` ``"page_major"``): page ``p``
is one contiguous block ``buffer[p]`` holding its ``page_size`` tokens' K and V for *all* layers, so
a transfer of page list ``src -> dst`` moves whole blocks, and a run of pages consecutive on both
sides is one contiguous range (one NIXL descriptor).

Compatibility. Both sides describe their pool with a ``KVLayout``; its ``compat_hash`` (every
field plus ``HANDSHAKE_VERSION``) travels in the handshake, and pairing a prefill worker with a
decode worker whose hash differs raises ``IncompatibleKVLayout`` naming the differing fields.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

HANDSHAKE_VERSION = 2
"""Version of the KV handshake (Redis records and NIXL notifications). Bump on any change of
their meaning; it is part of ``KVLayout.compat_hash`` so mixed versions refuse to pair.
History: 1, one K and one V tensor per layer (a page was ``2 * num_layers`` blocks); 2, the
page-major pool (a page is one block of all layers, ``AgentRecord.buffers`` has one address)."""

HANDSHAKE_HINT = "version 2 moved the KV pool to the page-major layout; run the same version on both sides"


@dataclass(frozen=True)
class KVLayout:
    """What must be identical on both sides for raw page bytes to mean the same thing.

    The number of pages is *not* part of it: each side sizes its pool freely.
    """

    model: str  # e.g. "LlamaForCausalLM:Llama-3-8B"; any stable name of the weights
    num_layers: int
    page_size: int  # tokens per page
    num_kv_heads: int  # per worker (after tensor-parallel sharding)
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix: "float32", "bfloat16", ...
    memory_layout: str = "page_major"  # KVPool.memory_layout: how a page's bytes are ordered

    @classmethod
    def from_pool(cls, pool: Any, model: str) -> KVLayout:
        """The layout of a ``KVPool`` (any object with its attributes)."""
        return cls(
            model=model, num_layers=pool.num_layers, page_size=pool.page_size,
            num_kv_heads=pool.num_kv_heads, head_dim=pool.head_dim, dtype=dtype_name(pool.dtype),
            memory_layout=pool.memory_layout,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def compat_hash(self) -> str:
        """Stable hex digest over every field and ``HANDSHAKE_VERSION`` (same on every machine)."""
        payload = {"handshake_version": HANDSHAKE_VERSION, **self.to_dict()}
        raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()[:32]

    def diff(self, other: KVLayout) -> list[str]:
        """Names of the fields whose values differ, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def check_pool(self, pool: Any) -> None:
        """Raise ``ValueError`` when ``pool`` (a ``KVPool``) does not have this layout."""
        got = KVLayout.from_pool(pool, self.model)
        bad = self.diff(got)
        if bad:
            parts = ", ".join(f"{n}: layout {getattr(self, n)!r} != pool {getattr(got, n)!r}" for n in bad)
            raise ValueError(f"KV pool does not match its KVLayout ({parts})")


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


class IncompatibleKVLayout(ValueError):
    """Raised at pairing time when the two sides' layouts (or handshake versions) differ.

    The message names every differing field with both values, e.g.
    ``"page_size: prefill 16 != decode 1"``; ``fields`` lists the names.
    """

    def __init__(self, message: str, fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.fields = list(fields or [])

    @classmethod
    def between(
        cls, mine: KVLayout, theirs: KVLayout, me: str = "prefill", them: str = "decode", context: str = ""
    ) -> IncompatibleKVLayout:
        names = mine.diff(theirs)
        parts = [f"{n}: {me} {getattr(mine, n)!r} != {them} {getattr(theirs, n)!r}" for n in names]
        detail = "; ".join(parts) or "layout hashes differ (handshake version?)"
        prefix = f"incompatible KV layout{(' ' + context) if context else ''}: "
        return cls(prefix + detail, names)


@dataclass
class TransferDest:
    """What the decode side publishes for a room: where the prompt's KV must be written.

    ``pages[i]`` receives the prompt's ``i``-th page. ``agent_instance`` identifies the decode
    agent's incarnation (a restarted worker with the same name has a new one).
    """

    room: int
    agent_name: str
    pages: list[int]
    layout_hash: str
    version: int
    agent_instance: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> TransferDest:
        d = json.loads(raw)
        return cls(
            room=int(d["room"]), agent_name=str(d["agent_name"]), pages=[int(p) for p in d["pages"]],
            layout_hash=str(d["layout_hash"]), version=int(d["version"]),
            agent_instance=str(d.get("agent_instance", "")),
        )


@dataclass
class RoomResult:
    """Decode side: a room's KV fully arrived (``ok``) or the room failed (``error`` says why).

    ``aux`` is the dict the prefill side sent with the last chunk (first token, logprob, ...);
    ``None`` when the room failed. ``quarantined`` (failed rooms only): a prefill agent claimed
    the room and may still have a write in flight into its pages, so the caller must keep them
    out of the free list until ``KVReceiver.released`` names the room.
    """

    room: int
    ok: bool
    aux: dict[str, Any] | None = None
    error: str | None = None
    quarantined: bool = False


@dataclass
class TransferStats:
    """One finished room, for metrics (``sglang:kv_transfer_speed_gb_s``, ``..._latency_ms``)."""

    room: int
    ok: bool
    bytes: int  # KV bytes written (all layers, K and V)
    seconds: float  # first send() to the last write's completion
    chunks: int
    peer: str = ""
    descriptors: int = 0  # NIXL descriptors posted (one per run of consecutive pages, else per page)
    wire_seconds: float = 0.0  # time with at least one write of the room on the wire (post -> DONE seen)

    @property
    def gb_per_s(self) -> float:
        """Transfer speed: bytes over the time writes were in flight. The latency (``seconds``)
        also holds the wait for the prefill's forward to finish before a chunk can be posted."""
        t = self.wire_seconds or self.seconds
        return self.bytes / t / 1e9 if t > 0 else 0.0


@dataclass
class TransportInfo:
    """What carries the bytes. ``selected`` maps an operation (e.g. ``"put intra-node host->host"``)
    to the UCX transports UCX chose for it (e.g. ``["cma/memory"]``); it fills in after the first
    transfer. ``tcp_fallback`` is true when a put to a peer went over TCP."""

    backend: str
    mem_type: str  # "DRAM" or "VRAM"
    env: dict[str, str] = field(default_factory=dict)  # UCX_* settings in effect
    params: dict[str, str] = field(default_factory=dict)  # backend init parameters
    selected: dict[str, list[str]] = field(default_factory=dict)
    tcp_fallback: bool = False
    note: str = ""


class KVSender(ABC):
    """Prefill side, one per worker. All methods are called from one thread (the scheduler's)
    and none blocks on a peer, except construction.

    Construction: ``(kv_pool, layout, agent_name, redis_url, timeout_s=30.0, **options)``.
    """

    @abstractmethod
    def dest(self, room: int) -> TransferDest | None:
        """The decode side's destination for ``room``, or ``None`` while it is not published yet.

        Cached once found; ``None`` again once the room was reported by ``poll`` or cancelled. Raises
        ``IncompatibleKVLayout`` when the decode side's layout hash differs; the decode side is
        then told to fail the room."""

    @abstractmethod
    def send(
        self,
        room: int,
        src_pages: list[int],
        dst_pages: list[int],
        chunk_id: int,
        last: bool,
        aux: dict[str, Any] | None = None,
    ) -> None:
        """Start writing ``src_pages[i] -> dst_pages[i]`` for all layers, K and V.

        Chunk ids must be distinct within a room; exactly one chunk is ``last`` and it carries
        ``aux`` (JSON-serialisable) and the room's chunk count. Empty page lists are allowed (a
        notification only). The source pages must stay untouched (not freed, not rewritten)
        until ``poll`` reports the room. Raises ``RuntimeError`` when no destination is known
        (call ``dest`` first) and ``ValueError`` for bad page lists; a send for a room that
        already failed (waiting to be reported) is dropped."""

    @abstractmethod
    def poll(self) -> list[tuple[int, bool, str | None]]:
        """Rooms whose last chunk was sent and whose every write finished: ``(room, True, None)``;
        or that failed (transfer error, decode side gone or aborted, timeout):
        ``(room, False, error)``. Each room is reported once and then forgotten."""

    @abstractmethod
    def cancel(self, room: int) -> None:
        """Forget ``room``: release its transfer handles and tell the decode side to fail it.
        Writes already posted may still land; the source pages are free after this returns
        only if no write was in flight (``poll`` had reported it, or none was sent)."""

    @abstractmethod
    def close(self) -> None:
        """Release everything (agent, Redis records, threads). Idempotent."""

    def transport_info(self) -> TransportInfo:
        return TransportInfo(backend="none", mem_type="DRAM")

    def pop_stats(self) -> list[TransferStats]:
        """Per-room statistics of rooms reported since the last call."""
        return []

    @property
    def writing(self) -> bool:
        """True while writes are posted and not yet seen complete (the loop may poll hot then)."""
        return False


class KVReceiver(ABC):
    """Decode side, one per worker. Same threading rules as ``KVSender``.

    Construction: ``(kv_pool, layout, agent_name, redis_url, timeout_s=30.0, **options)``.
    """

    @abstractmethod
    def publish(self, room: int, pages: list[int]) -> None:
        """Publish ``pages`` (reserved by the caller, one per prompt page) as the room's
        destination and start waiting for its KV. The caller keeps the pages reserved until
        ``poll`` reports the room or it calls ``cancel``."""

    @abstractmethod
    def poll(self) -> list[RoomResult]:
        """Rooms whose last chunk and every earlier chunk arrived (``ok``, with ``aux``), or that
        failed: no progress for ``timeout_s`` (error ``"timed out after Xs waiting for KV"``),
        the prefill side gone or aborted. Each room is reported once; the caller frees the pages
        of a failed room at once, or, when the result is ``quarantined``, once ``released``
        names it."""

    @abstractmethod
    def cancel(self, room: int) -> bool:
        """Stop waiting for ``room``; its destination is withdrawn and the prefill side is told to
        stop. True: the caller may free the pages now (no prefill agent claimed the room).
        False: they are quarantined until ``released`` names the room."""

    def released(self) -> list[int]:
        """Quarantined rooms (failed or cancelled after a prefill agent claimed them) whose pages
        may now be freed: the prefill side acknowledged, its agent is gone, or the quarantine
        timed out. Each room is named once."""
        return []

    @abstractmethod
    def close(self) -> None:
        """Release everything (agent, Redis records, threads). Idempotent."""

    def transport_info(self) -> TransportInfo:
        return TransportInfo(backend="none", mem_type="DRAM")
