"""Batched logit penalties: repetition, frequency/presence, min-new-tokens, logit bias.

All functions take float32 logits ``[B, V]`` (CPU or CUDA), modify them IN PLACE and return the
same tensor for chaining. Per-row parameters are 1-D tensors ``[B]`` on the logits' device. None of
them loops over the vocabulary in Python, and none forces a host-device synchronisation.

Semantics follow the reference implementations:

- repetition penalty: HF ``RepetitionPenaltyLogitsProcessor`` (CTRL paper) -- every token seen in
  the prompt or the output so far, once: ``score < 0 -> score * p`` else ``score / p``.
- frequency / presence: OpenAI -- ``logit -= freq * count + pres * (count > 0)``, counting OUTPUT
  tokens only.
- min new tokens: HF ``MinNewTokensLengthLogitsProcessor`` -- EOS (and the request's stop token
  ids) get ``-inf`` while fewer than ``min_new_tokens`` tokens have been generated.
- logit bias: additive, per (row, token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


def build_token_counts(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """Occurrence counts ``[B, V]`` (int32) of each token id in each row's list.

    One ``bincount`` over flattened ``row * V + token`` indices; ids must lie in ``[0, V)``.
    """
    batch = len(token_lists)
    lengths = [len(t) for t in token_lists]
    flat = [tok for tokens in token_lists for tok in tokens]
    if not flat:
        return torch.zeros((batch, vocab_size), dtype=torch.int32, device=device)
    tokens = torch.tensor(flat, dtype=torch.int64, device=device)
    rows = torch.repeat_interleave(
        torch.arange(batch, device=device), torch.tensor(lengths, dtype=torch.int64, device=device)
    )
    counts = torch.bincount(rows * vocab_size + tokens, minlength=batch * vocab_size)
    return counts.view(batch, vocab_size).to(torch.int32)


def apply_repetition_penalty(
    logits: torch.Tensor, token_mask_or_counts: torch.Tensor, penalties: torch.Tensor
) -> torch.Tensor:
    """Penalise every token present in ``token_mask_or_counts`` (bool mask or counts ``[B, V]``).

    ``penalties[B]``: 1.0 leaves the row unchanged; > 1 discourages repetition, < 1 encourages it.
    In place; returns ``logits``.
    """
    seen = token_mask_or_counts if token_mask_or_counts.dtype == torch.bool else token_mask_or_counts > 0
    p = penalties.to(logits.dtype).unsqueeze(1)
    penalized = torch.where(logits < 0, logits * p, logits / p)
    logits.copy_(torch.where(seen, penalized, logits))
    return logits


def apply_frequency_presence(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """OpenAI penalties from OUTPUT token counts ``[B, V]``: ``logits -= f*count + p*(count>0)``.

    In place; returns ``logits``.
    """
    counts = output_counts.to(logits.dtype)
    logits -= frequency_penalties.to(logits.dtype).unsqueeze(1) * counts
    logits -= presence_penalties.to(logits.dtype).unsqueeze(1) * (output_counts > 0).to(logits.dtype)
    return logits


def apply_min_new_tokens(
    logits: torch.Tensor,
    num_output_tokens: torch.Tensor,
    min_new_tokens: torch.Tensor,
    stop_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Set ``stop_ids[i]`` (EOS ids + the request's stop_token_ids) of row ``i`` to ``-inf`` while
    ``num_output_tokens[i] < min_new_tokens[i]``.

    ``stop_ids`` has one (possibly empty) list per row. In place; returns ``logits``.
    """
    rows_list = [row for row, ids in enumerate(stop_ids) for _ in ids]
    if not rows_list:
        return logits
    device = logits.device
    rows = torch.tensor(rows_list, dtype=torch.int64, device=device)
    cols = torch.tensor([tok for ids in stop_ids for tok in ids], dtype=torch.int64, device=device)
    active = (num_output_tokens.to(device) < min_new_tokens.to(device))[rows]
    current = logits[rows, cols]
    logits[rows, cols] = torch.where(active, torch.full_like(current, float("-inf")), current)
    return logits


@dataclass
class SparseLogitBias:
    """Logit biases as (row, token id, value) triples, for batches where few tokens are biased."""

    rows: torch.Tensor  # int64 [N]
    token_ids: torch.Tensor  # int64 [N]
    values: torch.Tensor  # float32 [N]

    @classmethod
    def from_dicts(
        cls, biases: Sequence[Mapping[int, float] | None], device: torch.device | str
    ) -> SparseLogitBias:
        """One mapping (token id -> bias) or ``None`` per row; keys must already be ints."""
        rows: list[int] = []
        toks: list[int] = []
        vals: list[float] = []
        for row, bias in enumerate(biases):
            for tok, val in (bias or {}).items():
                rows.append(row)
                toks.append(int(tok))
                vals.append(float(val))
        return cls(
            rows=torch.tensor(rows, dtype=torch.int64, device=device),
            token_ids=torch.tensor(toks, dtype=torch.int64, device=device),
            values=torch.tensor(vals, dtype=torch.float32, device=device),
        )


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor | SparseLogitBias) -> torch.Tensor:
    """Add ``bias`` (dense ``[B, V]`` or ``SparseLogitBias``) to ``logits``. In place; returns it."""
    if isinstance(bias, SparseLogitBias):
        if bias.rows.numel():
            logits.index_put_((bias.rows, bias.token_ids), bias.values.to(logits.dtype), accumulate=True)
        return logits
    logits += bias.to(logits.dtype)
    return logits
