"""Sampling: per-request parameters, batched penalties, the sampler and logprobs."""

from __future__ import annotations

from sglang.engine.sampling.logprobs import compute_logprobs, gather_token_logprobs, top_k_logprobs
from sglang.engine.sampling.params import SamplingParams
from sglang.engine.sampling.penalties import (
    SparseLogitBias,
    apply_frequency_presence,
    apply_logit_bias,
    apply_min_new_tokens,
    apply_repetition_penalty,
    build_token_counts,
)
from sglang.engine.sampling.sampler import (
    SampleOutput,
    Sampler,
    SamplingBatch,
    apply_penalties,
    process_logits_for_sampling,
)

__all__ = [
    "SampleOutput",
    "Sampler",
    "SamplingBatch",
    "SamplingParams",
    "SparseLogitBias",
    "apply_frequency_presence",
    "apply_logit_bias",
    "apply_min_new_tokens",
    "apply_penalties",
    "apply_repetition_penalty",
    "build_token_counts",
    "compute_logprobs",
    "gather_token_logprobs",
    "process_logits_for_sampling",
    "top_k_logprobs",
]
