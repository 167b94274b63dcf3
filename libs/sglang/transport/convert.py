"""Plain Python (``sglang.transport.types``, SGLang dicts) <-> generated proto messages.

Contract:

* ``sampling_params`` dicts use SGLang's names. Fields declared ``optional`` in the proto are
  absent from the decoded dict when unset, so the engine's defaults apply; ``0``/``False`` that was
  set explicitly survives the round trip (``{"temperature": 0.0}`` stays greedy). Plain proto3
  fields (``min_p``, penalties, ``min_new_tokens``, ``stop``, ...) cannot tell "unset" from their
  zero value, which *is* their default; they are decoded only when non-zero (canonical form).
* Floats travel as float32; decoding returns the shortest decimal that round-trips through
  float32 (``0.7`` comes back as ``0.7``, not ``0.699999988``).
* Encoding never silently drops or coerces: an unknown key, a wrong type or an out-of-range
  integer raises :class:`InvalidParam` (a ``ValueError`` naming the parameter), which callers map
  to a 400.
* Logprob entries are ``(logprob, token_id, top)`` with ``top`` a list of ``(logprob, token_id)``
  or None (see ``types.LogprobEntry``); an empty top list on the wire decodes as None.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from sglang.transport.types import GenerateEvent, GenerateInput, LogprobEntry
from sglang.v1 import common_pb2, worker_pb2


class InvalidParam(ValueError):
    """A value that cannot be put on the wire; ``param`` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------------------------------
# Sampling params
# ---------------------------------------------------------------------------------------------

_OPT_INT = ("max_new_tokens", "top_k", "n")
_OPT_FLOAT = ("temperature", "top_p", "repetition_penalty")
_OPT_STR = ("regex", "json_schema", "ebnf")
_PLAIN_FLOAT = ("min_p", "frequency_penalty", "presence_penalty")
_PLAIN_BOOL = ("ignore_eos", "no_stop_trim")
SAMPLING_FIELDS: tuple[str, ...] = tuple(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)


def f32(x: float) -> float:
    """The shortest decimal float that equals ``x`` once rounded to float32."""
    if not math.isfinite(x):
        return x
    (target,) = struct.unpack("<f", struct.pack("<f", x))
    for digits in range(6, 10):
        y = float(f"{target:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", y))[0] == target:
            return y
    return float(target)


def _int(name: str, value: Any, bounds: tuple[int, int] = _INT32) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParam(name, f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise InvalidParam(name, f"{name} must be in [{bounds[0]}, {bounds[1]}], got {value}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParam(name, f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidParam(name, f"{name} must be true or false, got {value!r}")
    return value


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidParam(name, f"{name} must be a string, got {type(value).__name__}")
    return value


def _token_id(name: str, key: Any) -> int:
    if isinstance(key, str):
        try:
            key = int(key)
        except ValueError:
            raise InvalidParam(name, f"{name} keys must be token ids (integers), got {key!r}") from None
    return _int(name, key)


def sampling_params_to_proto(params: dict[str, Any] | None) -> common_pb2.SamplingParams:
    """Encode an SGLang sampling-params dict; ``None`` values count as unset."""
    msg = common_pb2.SamplingParams()
    if params is None:
        return msg
    if not isinstance(params, dict):
        raise InvalidParam("sampling_params", f"sampling_params must be an object, got {type(params).__name__}")
    for key, value in params.items():
        if key not in SAMPLING_FIELDS:
            raise InvalidParam(
                key, f"unknown sampling parameter {key!r}; known: {', '.join(SAMPLING_FIELDS)}"
            )
        if value is None:
            continue
        if key in _OPT_INT or key == "min_new_tokens":
            setattr(msg, key, _int(key, value))
        elif key == "seed":
            msg.seed = _int(key, value, _INT64)
        elif key in _OPT_FLOAT or key in _PLAIN_FLOAT:
            setattr(msg, key, _float(key, value))
        elif key in _OPT_STR:
            setattr(msg, key, _str(key, value))
        elif key in _PLAIN_BOOL or key == "skip_special_tokens":
            setattr(msg, key, _bool(key, value))
        elif key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list):
                raise InvalidParam(key, f"stop must be a string or a list of strings, got {value!r}")
            msg.stop.extend(_str(key, s) for s in stops)
        elif key == "stop_token_ids":
            if not isinstance(value, list):
                raise InvalidParam(key, f"stop_token_ids must be a list of ints, got {value!r}")
            msg.stop_token_ids.extend(_int(key, t) for t in value)
        elif key == "logit_bias":
            if not isinstance(value, dict):
                raise InvalidParam(key, f"logit_bias must be an object of token id -> bias, got {value!r}")
            for tok, bias in value.items():
                msg.logit_bias[_token_id(key, tok)] = _float(key, bias)
    return msg


def sampling_params_from_proto(msg: common_pb2.SamplingParams) -> dict[str, Any]:
    """Decode to an SGLang dict: unset optional fields and zero plain fields are left out."""
    out: dict[str, Any] = {}
    for key in _OPT_INT + ("seed",):
        if msg.HasField(key):
            out[key] = getattr(msg, key)
    for key in _OPT_FLOAT:
        if msg.HasField(key):
            out[key] = f32(getattr(msg, key))
    for key in _OPT_STR + ("skip_special_tokens",):
        if msg.HasField(key):
            out[key] = getattr(msg, key)
    for key in _PLAIN_FLOAT:
        if getattr(msg, key) != 0.0:
            out[key] = f32(getattr(msg, key))
    for key in _PLAIN_BOOL:
        if getattr(msg, key):
            out[key] = True
    if msg.min_new_tokens:
        out["min_new_tokens"] = msg.min_new_tokens
    if msg.stop:
        out["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        out["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.logit_bias:
        out["logit_bias"] = {int(k): f32(v) for k, v in sorted(msg.logit_bias.items())}
    return out


# ---------------------------------------------------------------------------------------------
# Logprobs and finish reasons
# ---------------------------------------------------------------------------------------------


def logprob_to_proto(entry: LogprobEntry) -> common_pb2.TokenLogprob:
    logprob, token_id, top = entry
    msg = common_pb2.TokenLogprob(token_id=token_id)
    if logprob is not None:
        msg.logprob = logprob
    for lp, tok in top or ():
        msg.top_token_ids.append(tok)
        msg.top_logprobs.append(lp)
    return msg


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> LogprobEntry:
    logprob = msg.logprob if msg.HasField("logprob") else None
    top = [(lp, tok) for lp, tok in zip(msg.top_logprobs, msg.top_token_ids, strict=True)] or None
    return (logprob, msg.token_id, top)


def logprob_entries(
    token_logprobs: Sequence[tuple[float | None, int, Any]],
    top_logprobs: Sequence[Sequence[tuple[float, int, Any]] | None] | None = None,
) -> list[LogprobEntry]:
    """Engine ``meta_info`` lists (``output_token_logprobs`` + ``output_top_logprobs``, SGLang's
    ``(logprob, token_id, text)`` tuples) -> transport entries."""
    tops: Sequence[Sequence[tuple[float, int, Any]] | None] = top_logprobs or [None] * len(token_logprobs)
    out: list[LogprobEntry] = []
    for (lp, tok, _), top in zip(token_logprobs, tops, strict=False):
        out.append((lp, tok, [(t[0], t[1]) for t in top] if top else None))
    return out


def finish_reason_to_proto(reason: dict[str, Any]) -> common_pb2.FinishReason:
    msg = common_pb2.FinishReason(type=str(reason.get("type", "")))
    matched = reason.get("matched")
    if isinstance(matched, bool):
        raise InvalidParam("finish_reason", f"matched must be a token id or a string, got {matched!r}")
    if isinstance(matched, int):
        msg.matched_token = matched
    elif isinstance(matched, str):
        msg.matched_str = matched
    if reason.get("message"):
        msg.message = str(reason["message"])
    return msg


def finish_reason_from_proto(msg: common_pb2.FinishReason) -> dict[str, Any]:
    out: dict[str, Any] = {"type": msg.type}
    which = msg.WhichOneof("matched")
    if which is not None:
        out["matched"] = getattr(msg, which)
    if msg.message:
        out["message"] = msg.message
    return out


# ---------------------------------------------------------------------------------------------
# Generate
# ---------------------------------------------------------------------------------------------


def generate_input_to_proto(inp: GenerateInput) -> worker_pb2.GenerateRequest:
    ids = [_int("input_ids", t) for t in inp.input_ids]
    msg = worker_pb2.GenerateRequest(
        request_id=inp.request_id,
        input_ids=common_pb2.TokenIds(ids=ids),
        sampling_params=sampling_params_to_proto(inp.sampling_params),
        return_logprob=inp.return_logprob,
        top_logprobs_num=_int("top_logprobs_num", inp.top_logprobs_num),
        stream=inp.stream,
    )
    if inp.logprob_start_len is not None:
        msg.logprob_start_len = _int("logprob_start_len", inp.logprob_start_len)
    if inp.bootstrap_room is not None:
        msg.bootstrap_room = _int("bootstrap_room", inp.bootstrap_room, _UINT64)
    return msg


def generate_input_from_proto(msg: worker_pb2.GenerateRequest) -> GenerateInput:
    return GenerateInput(
        request_id=msg.request_id,
        input_ids=list(msg.input_ids.ids),
        sampling_params=sampling_params_from_proto(msg.sampling_params),
        return_logprob=msg.return_logprob,
        logprob_start_len=msg.logprob_start_len if msg.HasField("logprob_start_len") else None,
        top_logprobs_num=msg.top_logprobs_num,
        stream=msg.stream,
        bootstrap_room=msg.bootstrap_room if msg.HasField("bootstrap_room") else None,
    )


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded", 500: "internal_error"}


def _logprobs(entries: Iterable[LogprobEntry]) -> list[common_pb2.TokenLogprob]:
    return [logprob_to_proto(e) for e in entries]


def event_to_proto(ev: GenerateEvent) -> worker_pb2.GenerateResponse:
    msg = worker_pb2.GenerateResponse(request_id=ev.request_id)
    if ev.kind == "chunk":
        msg.chunk.CopyFrom(
            worker_pb2.GenerateChunk(
                token_ids=ev.token_ids,
                output_logprobs=_logprobs(ev.output_logprobs),
                prompt_tokens=ev.prompt_tokens,
                completion_tokens=ev.completion_tokens,
                cached_tokens=ev.cached_tokens,
            )
        )
    elif ev.kind == "complete":
        msg.complete.CopyFrom(
            worker_pb2.GenerateComplete(
                output_ids=ev.token_ids,
                finish_reason=finish_reason_to_proto(ev.finish_reason or {}),
                usage=common_pb2.Usage(
                    prompt_tokens=ev.prompt_tokens,
                    completion_tokens=ev.completion_tokens,
                    cached_tokens=ev.cached_tokens,
                ),
                output_logprobs=_logprobs(ev.output_logprobs),
                input_logprobs=_logprobs(ev.input_logprobs),
            )
        )
    elif ev.kind == "error":
        msg.error.CopyFrom(
            common_pb2.Error(
                code=ev.error_code,
                message=ev.error_message,
                param=ev.error_param,
                type=ERROR_TYPES.get(ev.error_code, "internal_error" if ev.error_code >= 500 else "invalid_request_error"),
            )
        )
    else:
        raise ValueError(f"unknown GenerateEvent kind {ev.kind!r}")
    return msg


def event_from_proto(msg: worker_pb2.GenerateResponse) -> GenerateEvent:
    which = msg.WhichOneof("response")
    if which == "chunk":
        c = msg.chunk
        return GenerateEvent(
            kind="chunk",
            request_id=msg.request_id,
            token_ids=list(c.token_ids),
            output_logprobs=[logprob_from_proto(x) for x in c.output_logprobs],
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cached_tokens=c.cached_tokens,
        )
    if which == "complete":
        d = msg.complete
        return GenerateEvent(
            kind="complete",
            request_id=msg.request_id,
            token_ids=list(d.output_ids),
            output_logprobs=[logprob_from_proto(x) for x in d.output_logprobs],
            input_logprobs=[logprob_from_proto(x) for x in d.input_logprobs],
            finish_reason=finish_reason_from_proto(d.finish_reason),
            prompt_tokens=d.usage.prompt_tokens,
            completion_tokens=d.usage.completion_tokens,
            cached_tokens=d.usage.cached_tokens,
        )
    if which == "error":
        e = msg.error
        return GenerateEvent(
            kind="error", request_id=msg.request_id,
            error_code=e.code, error_message=e.message, error_param=e.param,
        )
    raise ValueError("GenerateResponse carries no chunk, complete or error")


# ---------------------------------------------------------------------------------------------
# Load and model info (plain dicts with the proto's field names)
# ---------------------------------------------------------------------------------------------

_LOAD_FIELDS = tuple(worker_pb2.Load.DESCRIPTOR.fields_by_name)
_INFO_FIELDS = tuple(worker_pb2.ModelInfo.DESCRIPTOR.fields_by_name)


def load_to_proto(stats: dict[str, Any]) -> worker_pb2.Load:
    """From ``Engine.get_stats()`` (extra keys are ignored)."""
    return worker_pb2.Load(**{k: stats[k] for k in _LOAD_FIELDS if k in stats})


def load_from_proto(msg: worker_pb2.Load) -> dict[str, Any]:
    d = _to_dict(msg)
    for k in ("token_usage", "cache_hit_rate"):
        d[k] = f32(d[k])
    return d


def model_info_to_proto(info: dict[str, Any]) -> worker_pb2.ModelInfo:
    return worker_pb2.ModelInfo(**{k: info[k] for k in _INFO_FIELDS if k in info})


def model_info_from_proto(msg: worker_pb2.ModelInfo) -> dict[str, Any]:
    return _to_dict(msg)


def _to_dict(msg: Any) -> dict[str, Any]:
    """Every field (flat messages of scalars and repeated scalars only)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        out[f.name] = value if isinstance(value, (str, bytes, int, float)) else list(value)
    return out
