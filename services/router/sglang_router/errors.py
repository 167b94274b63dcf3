"""The router's one error type and its OpenAI-style JSON body.

Every failure a client can see is a :class:`RouterError`: HTTP status, message, OpenAI ``type``,
the offending ``param`` (a request field name) and a ``code``. HTTP answers with
``{"error": {"message", "type", "param", "code"}}`` (``Retry-After`` on 503); gRPC sends the same
fields in an ``Error`` message; a stream that already started ends with that body as its last event.
"""

from __future__ import annotations

import re
from typing import Any

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


class RouterError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        code: str | int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or STATUS_TYPES.get(status, "internal_error" if status >= 500 else "invalid_request_error")
        self.code = code if code is not None else status
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"RouterError({self.status}, {self.message!r}, param={self.param!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> RouterError:
    return RouterError(400, message, param=param, code=code or "invalid_request_error")


def param_of_value_error(message: str) -> str | None:
    """The parameter a ``SamplingParams`` error message names: its first word when that is a
    parameter name, or the quoted name of an unknown parameter."""
    m = re.match(r"unknown sampling parameter '([^']+)'", message)
    if m:
        return m.group(1)
    head = message.split(" ", 1)[0].strip(":,")
    return head if head in _SAMPLING_NAMES else None


_SAMPLING_NAMES = {
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "min_new_tokens", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "n", "seed", "regex", "json_schema", "ebnf", "logit_bias", "no_stop_trim",
    "sampling_params",
}
