"""Engine input normalization and validation, and output dicts in SGLang's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sglang.engine.sampling.params import SamplingParams
from sglang.engine.scheduler.output_processor import OutputProcessor
from sglang.engine.scheduler.request import Request


@dataclass
class PromptSpec:
    """One prompt of a ``generate`` call, validated, with its parsed sampling params."""

    input_ids: list[int]
    params: SamplingParams


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def normalize_inputs(
    prompt: str | list[str] | None,
    input_ids: list[int] | list[list[int]] | None,
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None,
) -> tuple[list[str | None], list[list[int] | None], list[dict[str, Any]], bool]:
    """Returns per-prompt text, per-prompt ids, per-prompt params and whether it was a batch."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt or input_ids")
    if prompt is not None:
        is_batch = isinstance(prompt, list)
        texts: list[str | None] = list(_as_list(prompt))
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"prompt must be a string or a list of strings, got {type(t).__name__}")
            if t == "":
                raise ValueError("prompt is empty; pass at least one character")
        ids: list[list[int] | None] = [None] * len(texts)
    else:
        assert input_ids is not None
        if not isinstance(input_ids, list):
            raise ValueError("input_ids must be a list of ints or a list of lists of ints")
        is_batch = bool(input_ids) and isinstance(input_ids[0], list)
        ids = list(input_ids) if is_batch else [input_ids]  # type: ignore[arg-type,list-item]
        texts = [None] * len(ids)
    n = len(texts)
    if n == 0:
        raise ValueError("prompt is an empty batch")
    if sampling_params is None:
        params_list: list[dict[str, Any]] = [{}] * n
    elif isinstance(sampling_params, list):
        if len(sampling_params) != n:
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {n} prompts")
        params_list = sampling_params
    elif isinstance(sampling_params, dict):
        params_list = [sampling_params] * n
    else:
        raise ValueError("sampling_params must be a dict or a list of dicts")
    return texts, ids, params_list, is_batch


def validate_ids(ids: list[int], vocab_size: int, context_length: int, kv_capacity: int) -> None:
    if not ids:
        raise ValueError("input_ids is empty; the prompt needs at least one token")
    # The common case in C (types, then min and max): ~6x faster than the loop below, which
    # finds the offending entry for the message (1,000 prompts of 1,024 ids: 0.25 -> 0.04 s).
    if set(map(type, ids)) != {int} or min(ids) < 0 or max(ids) >= vocab_size:
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
                raise ValueError(f"input_ids contains {t!r}, not a token id in [0, {vocab_size})")
    if len(ids) >= context_length:
        raise ValueError(
            f"prompt has {len(ids)} tokens but the context length is {context_length}; "
            f"shorten the prompt to at most {context_length - 1} tokens"
        )
    if len(ids) + 1 > kv_capacity:
        raise ValueError(
            f"prompt has {len(ids)} tokens but the KV cache holds {kv_capacity}; raise max_total_tokens"
        )


def build_output(req: Request, index: int | None = None) -> dict[str, Any]:
    """Snapshot of ``req`` for the caller (cumulative text and ids, SGLang's ``meta_info``)."""
    text = OutputProcessor.streamable_text(req)
    meta: dict[str, Any] = {
        "id": req.rid,
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "finish_reason": req.finish_reason.to_dict() if req.finish_reason else None,
    }
    if req.return_logprob:
        meta["input_token_logprobs"] = list(req.input_token_logprobs)
        meta["output_token_logprobs"] = list(req.output_token_logprobs)
        if req.top_logprobs_num > 0:
            meta["input_top_logprobs"] = list(req.input_top_logprobs)
            meta["output_top_logprobs"] = list(req.output_top_logprobs)
    out: dict[str, Any] = {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}
    if index is not None:
        out["index"] = index
    return out
