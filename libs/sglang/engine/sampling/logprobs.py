"""Log-probabilities of chosen tokens and top-N alternatives.

Used for output tokens (one row per request) and for prompt tokens: with prompt logits
``[T, V]`` for positions ``0..T-1``, the logprob of prompt token ``t + 1`` given the prefix up to
``t`` is ``gather_token_logprobs(compute_logprobs(logits[:-1]), input_ids[1:])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dim, in float32 (a new tensor; the input is not touched)."""
    return torch.log_softmax(logits.float(), dim=-1)


def gather_token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``logprobs[i, token_ids[i]]`` for each row: ``[T, V], [T] -> [T]``."""
    index = token_ids.to(device=logprobs.device, dtype=torch.int64).unsqueeze(1)
    return logprobs.gather(1, index).squeeze(1)


def top_k_logprobs(logprobs: torch.Tensor, ks: Sequence[int]) -> list[list[tuple[float, int]]]:
    """Per row ``i``, the ``ks[i]`` largest ``(logprob, token_id)`` pairs, largest first.

    ``ks[i] == 0`` gives an empty list. One ``topk`` with ``max(ks)`` for the whole batch and a
    single device-to-host copy.
    """
    if len(ks) != logprobs.shape[0]:
        raise ValueError(f"ks has {len(ks)} entries for {logprobs.shape[0]} rows")
    max_k = min(max(ks, default=0), logprobs.shape[-1])
    if max_k <= 0:
        return [[] for _ in ks]
    values, indices = logprobs.topk(max_k, dim=-1)
    values_list = values.tolist()
    indices_list = indices.tolist()
    return [list(zip(values_list[row][:k], indices_list[row][:k], strict=True)) for row, k in enumerate(ks)]
