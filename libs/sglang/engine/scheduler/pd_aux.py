"""What the prefill side tells the decode side besides the KV: the last chunk's ``aux``.

The ``aux`` rides, JSON-encoded, in the last chunk's NIXL notification
(kv_transfer/notifications.py), so it must stay small. Its keys:

- ``first_token``, ``logprob``, ``cached_tokens``: always;
- with ``return_logprob`` only: ``lp_opts`` = ``[logprob_start_len, top_logprobs_num]`` as the
  prefill request had them (the decode side refuses a pair whose options differ, rather than
  answer with logprobs that were never computed), ``top`` = the first token's top logprobs as
  ``[[logprob, token_id], ...]`` (absent when ``top_logprobs_num`` is 0), and ``input`` = the
  prompt logprobs (absent when none were asked for).

``input`` is compact: little-endian base64 arrays, not JSON numbers. ``lp`` (float32, one per
recorded prompt position, NaN for the position-0 entry that has no logprob), ``ids`` (int32, the
scored prompt tokens), ``top_n`` (int32, the length of each position's top list, -1 for none),
``top_lp`` / ``top_ids`` (float32 / int32, the top lists concatenated). Logprobs are float32 on
both sides, so they arrive bit-identical. That is 8 bytes per position plus 8 per top entry,
times 4/3 for base64: a 32k-token prompt with ``top_logprobs_num=5`` is about 2 MiB.

The whole encoded ``aux`` is bounded by ``MAX_AUX_BYTES``; a request over it fails on both sides
with a message that says what to ask for instead (a later ``logprob_start_len``, fewer top logprobs).
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np

from sglang.engine.scheduler.request import Request

MAX_AUX_BYTES = 4 << 20  # 4 MiB: one NIXL (UCX active message) notification


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


def _unb64(s: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype)


def build_aux(req: Request) -> dict[str, Any]:
    """The last chunk's ``aux`` for a prefill request that sampled its first token. Raises
    ``ValueError`` when it would exceed ``MAX_AUX_BYTES``."""
    aux: dict[str, Any] = {
        "first_token": req.output_ids[0],
        "logprob": req.output_token_logprobs[0][0] if req.output_token_logprobs else None,
        "cached_tokens": req.cached_tokens,
    }
    if not req.return_logprob:
        return aux
    aux["lp_opts"] = [req.logprob_start_len, req.top_logprobs_num]
    top = req.output_top_logprobs[0] if req.output_top_logprobs else None
    if top is not None:
        aux["top"] = [[v, t] for v, t, _ in top]
    if req.input_token_logprobs:
        aux["input"] = _pack_input(req)
    size = len(json.dumps(aux, separators=(",", ":")))
    if size > MAX_AUX_BYTES:
        n = len(req.input_token_logprobs)
        raise ValueError(
            f"prompt logprobs for {n} positions with top_logprobs_num={req.top_logprobs_num} take {size} bytes, "
            f"over the {MAX_AUX_BYTES}-byte bound of the prefill-to-decode notification; ask for fewer "
            f"(a logprob_start_len closer to the end of the prompt, or a smaller top_logprobs_num)"
        )
    return aux


def _pack_input(req: Request) -> dict[str, str]:
    lp = np.array([math.nan if v is None else v for v, _, _ in req.input_token_logprobs], dtype="<f4")
    ids = np.array([t for _, t, _ in req.input_token_logprobs], dtype="<i4")
    tops = req.input_top_logprobs
    top_n = np.array([-1 if e is None else len(e) for e in tops], dtype="<i4")
    top_lp = np.array([v for e in tops if e for v, _, _ in e], dtype="<f4")
    top_ids = np.array([t for e in tops if e for _, t, _ in e], dtype="<i4")
    return {"lp": _b64(lp), "ids": _b64(ids), "top_n": _b64(top_n), "top_lp": _b64(top_lp), "top_ids": _b64(top_ids)}


def apply_aux(req: Request, aux: dict[str, Any]) -> list[tuple[float, int]] | None:
    """Decode side: set the prefill's prompt logprobs on ``req``; return the first token's top
    logprobs (None when not asked for). ``ValueError`` when the two sides' logprob options differ
    or the payload is malformed."""
    if not req.return_logprob:
        return None
    want = [req.logprob_start_len, req.top_logprobs_num]
    got = aux.get("lp_opts")
    if got != want:
        have = "return_logprob=False" if got is None else f"logprob_start_len={got[0]}, top_logprobs_num={got[1]}"
        raise ValueError(
            f"logprob options differ between the prefill side ({have}) and the decode side "
            f"(logprob_start_len={want[0]}, top_logprobs_num={want[1]}): send both halves the same"
        )
    top = aux.get("top")
    first_top = [(float(v), int(t)) for v, t in top] if top is not None else None
    packed = aux.get("input")
    if packed is not None:
        _unpack_input(req, packed)
    return first_top


def _unpack_input(req: Request, packed: dict[str, str]) -> None:
    lp = _unb64(packed["lp"], "<f4").tolist()
    ids = _unb64(packed["ids"], "<i4").tolist()
    top_n = _unb64(packed["top_n"], "<i4").tolist()
    top_lp = _unb64(packed["top_lp"], "<f4").tolist()
    top_ids = _unb64(packed["top_ids"], "<i4").tolist()
    if not len(lp) == len(ids) == len(top_n) or len(top_lp) != len(top_ids) or sum(max(n, 0) for n in top_n) != len(top_lp):
        raise ValueError("malformed prompt logprobs from the prefill side (array lengths disagree)")
    tops: list[list[tuple[float, int, None]] | None] = []
    off = 0
    for n in top_n:
        if n < 0:
            tops.append(None)
            continue
        tops.append([(top_lp[i], top_ids[i], None) for i in range(off, off + n)])
        off += n
    req.input_token_logprobs = [(None if math.isnan(v) else v, t, None) for v, t in zip(lp, ids, strict=True)]
    req.input_top_logprobs = tops
