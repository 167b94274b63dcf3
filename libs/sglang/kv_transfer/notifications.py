"""NIXL notification messages (wire format ``HANDSHAKE_VERSION``): compact JSON objects.

prefill -> decode
  ``{"v":2,"t":"claim","room":R}``                       a prefill agent paired with room R
  ``{"v":2,"t":"chunk","room":R,"chunk":C,"last":false}``  chunk C's pages have landed
  ``{"v":2,"t":"chunk","room":R,"chunk":C,"last":true,"n":N,"aux":{...}}``  the last one; N chunks in all
  ``{"v":2,"t":"abort","room":R,"error":"..."}``          the prefill side gave the room up
  ``{"v":2,"t":"released","room":R,"error":"..."}``       the prefill side closed room R without
      finishing it and holds no write into its pages any more (every transfer handle released):
      the answer to a decode ``abort``, and sent after its own ``abort``/failure too. Until it
      arrives (or the prefill agent's heartbeat lapses) the decode side keeps the pages quarantined
decode -> prefill
  ``{"v":2,"t":"abort","room":R,"error":"..."}``          the decode side gave the room up

A chunk notification rides on its WRITE, which NIXL delivers after the write's data; empty chunks
(no pages) go as standalone notifications. Receivers ignore other versions and unknown types,
except an ``abort`` of another version: it still fails the room, its error saying that the two
sides speak different handshake versions (so mixed versions fail fast, not by timeout).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sglang.kv_transfer.base import HANDSHAKE_HINT, HANDSHAKE_VERSION

logger = logging.getLogger(__name__)

CLAIM = "claim"
CHUNK = "chunk"
ABORT = "abort"
RELEASED = "released"


@dataclass
class Notification:
    kind: str
    room: int
    chunk: int = -1
    last: bool = False
    num_chunks: int = 0
    aux: dict[str, Any] | None = None
    error: str = ""

    def encode(self) -> bytes:
        d: dict[str, Any] = {"v": HANDSHAKE_VERSION, "t": self.kind, "room": self.room}
        if self.kind == CHUNK:
            d["chunk"] = self.chunk
            d["last"] = self.last
            if self.last:
                d["n"] = self.num_chunks
                d["aux"] = self.aux
        elif self.kind in (ABORT, RELEASED):
            d["error"] = self.error
        return json.dumps(d, separators=(",", ":")).encode()


def decode(raw: bytes, sender: str) -> Notification | None:
    """Parse one message; ``None`` (logged) for anything not ours or malformed."""
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("v") != HANDSHAKE_VERSION:
            if isinstance(d, dict) and d.get("t") == ABORT and isinstance(d.get("room"), int):
                why = f"KV handshake_version: this side {HANDSHAKE_VERSION} != {sender} {d.get('v')!r} ({HANDSHAKE_HINT})"
                logger.warning("kv_transfer: %s; failing room %d", why, d["room"])
                return Notification(ABORT, d["room"], error=f"{why}: {d.get('error', '')}")
            logger.warning("kv_transfer: ignoring notification of another version from %s: %.200r", sender, raw)
            return None
        kind = d["t"]
        room = int(d["room"])
        if kind == CHUNK:
            last = bool(d["last"])
            aux = d.get("aux") if last else None
            return Notification(
                CHUNK, room, int(d["chunk"]), last, int(d["n"]) if last else 0, aux if isinstance(aux, dict) else None
            )
        if kind == CLAIM:
            return Notification(CLAIM, room)
        if kind in (ABORT, RELEASED):
            return Notification(kind, room, error=str(d.get("error", "")))
    except (ValueError, KeyError, TypeError) as e:
        logger.warning("kv_transfer: malformed notification from %s (%s): %.200r", sender, e, raw)
        return None
    logger.warning("kv_transfer: unknown notification type from %s: %.200r", sender, raw)
    return None
