"""Plain-Python shapes of the Worker RPCs, so callers never touch generated proto classes.

``sampling_params`` dicts use SGLang's names (see ``SamplingParams``); logprob entries are
``(logprob, token_id, top)`` where ``top`` is a list of ``(logprob, token_id)`` or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

LogprobEntry = tuple[float | None, int, list[tuple[float, int]] | None]


class WorkerUnavailable(ConnectionError):
    """The worker could not be reached or its stream broke (dead, draining, network)."""


@dataclass
class GenerateInput:
    request_id: str
    input_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)  # n must be 1 (the router fans out)
    return_logprob: bool = False
    logprob_start_len: int | None = None  # None: no prompt logprobs
    top_logprobs_num: int = 0
    stream: bool = True
    bootstrap_room: int | None = None  # PD: pairs a Prefill with its Decode (0 <= room < 2**64)


@dataclass
class GenerateEvent:
    """One message of the Generate stream: new tokens (``chunk``), the end (``complete``), or a
    request-level error (``error``: ``error_code`` 400 bad input, 503 overloaded, 500 internal)."""

    kind: Literal["chunk", "complete", "error"]
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)  # new tokens in this message
    output_logprobs: list[LogprobEntry] = field(default_factory=list)  # for token_ids, when asked
    input_logprobs: list[LogprobEntry] = field(default_factory=list)  # on complete, when asked
    finish_reason: dict[str, Any] | None = None  # SGLang's shape, on complete
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error_code: int = 0
    error_message: str = ""
    error_param: str = ""
