"""The batched sampler: one call per engine step turns logits ``[B, V]`` into next tokens.

Order inside ``Sampler.__call__`` (each stage is a function here, so tests can compare it with HF):

1. raw logprobs: ``log_softmax`` of the logits as the model produced them;
2. ``apply_penalties``: repetition, frequency/presence, min_new_tokens, logit_bias (on a copy);
3. greedy rows: ``argmax`` of the penalised logits (equals HF greedy search);
4. sampled rows: ``process_logits_for_sampling`` -- temperature, top-k, top-p, min-p, each
   renormalising before the next as HF's warper chain does -- then one categorical draw.

The draw is the exponential race ``argmax(probs / q)`` with ``q ~ Exp(1)`` per token, which picks
token ``i`` with probability ``probs[i]`` -- the same algorithm ``torch.multinomial`` runs for one
sample, minus the validity check that makes every ``torch.multinomial`` call on CUDA wait for the
GPU (one host sync per seeded row per step). Seeded rows fill their ``q`` row from their own
``torch.Generator`` (owned by the request and passed in again every step), so their draw depends
only on their seed, step and logits -- never on which other requests share the batch. Unseeded
rows fill theirs in one call from the global RNG. No step synchronises with the host unless top
logprobs are asked for.

On CUDA, a batch whose sampled rows only apply a temperature (no top-k/top-p/min-p, no seed)
draws in one Triton pass instead: ``argmax(logits / T + Gumbel noise)``, the same distribution as
the race (``-log q`` of an Exp(1) variable is Gumbel), with noise from a philox stream that the
global CPU RNG seeds once per step (``fused_sampling_applies``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang.engine.layers.fused import use_fused
from sglang.engine.sampling.logprobs import compute_logprobs, top_k_logprobs
from sglang.engine.sampling.params import SamplingParams
from sglang.engine.sampling.penalties import (
    SparseLogitBias,
    apply_frequency_presence,
    apply_logit_bias,
    apply_min_new_tokens,
    apply_repetition_penalty,
    build_token_counts,
)
from sglang.utils.tensors import to_device


@dataclass
class SamplingBatch:
    """Everything the sampler needs for one step, built once per step by ``build``.

    Filter tensors are ``[B]`` on the logits' device (``temperatures`` is ``[B, 1]``); greedy rows
    carry temperature 1 so no division by zero can happen. ``top_ks`` holds ``V`` where top-k is
    off. A penalty field is ``None`` when no row of the batch uses that penalty, so a batch
    without penalties costs nothing beyond the filters.
    """

    vocab_size: int
    temperatures: torch.Tensor  # float32 [B, 1]
    top_ps: torch.Tensor  # float32 [B]
    top_ks: torch.Tensor  # int64 [B], V when off
    min_ps: torch.Tensor  # float32 [B]
    is_greedy: list[bool]
    greedy_mask: torch.Tensor  # bool [B]
    is_all_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    generators: list[torch.Generator | None]
    # Rows that need the sort for top-k/top-p; None means every row (or none, when neither is needed).
    sort_rows: torch.Tensor | None = None  # int64 [R]
    # Penalties (None = unused by every row).
    repetition_penalties: torch.Tensor | None = None  # float32 [B]
    seen_tokens: torch.Tensor | None = None  # bool [B, V]: prompt or output
    frequency_penalties: torch.Tensor | None = None  # float32 [B]
    presence_penalties: torch.Tensor | None = None  # float32 [B]
    output_counts: torch.Tensor | None = None  # int32 [B, V]
    num_output_tokens: torch.Tensor | None = None  # int64 [B]
    min_new_tokens: torch.Tensor | None = None  # int64 [B]
    min_new_stop_ids: list[list[int]] | None = None  # EOS + stop_token_ids per row
    logit_bias: SparseLogitBias | None = None

    @property
    def batch_size(self) -> int:
        return len(self.is_greedy)

    @property
    def has_penalties(self) -> bool:
        """True when ``apply_penalties`` would change anything."""
        return (
            self.repetition_penalties is not None
            or self.output_counts is not None
            or self.min_new_stop_ids is not None
            or self.logit_bias is not None
        )

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
        generators: Sequence[torch.Generator | None],
    ) -> SamplingBatch:
        """Gather per-request parameters into batch tensors on ``device``.

        ``params`` must be normalized and verified. ``prompt_ids`` / ``output_ids`` are each
        request's prompt and generated tokens so far (only read when some row uses a penalty that
        needs them). ``eos_token_ids`` is the model's EOS set, masked by ``min_new_tokens``.
        ``generators[i]`` is request ``i``'s own generator (on ``device``) or ``None``.
        """
        batch = len(params)
        if not (len(prompt_ids) == len(output_ids) == len(generators) == batch):
            raise ValueError("params, prompt_ids, output_ids and generators must have one entry per row")
        greedy = [p.is_greedy for p in params]
        top_ks = [vocab_size if p.top_k < 0 or p.top_k > vocab_size else p.top_k for p in params]
        # Filters are only meaningful on sampled rows; greedy rows keep neutral values.
        wants_top_k = [k < vocab_size and not g for k, g in zip(top_ks, greedy, strict=True)]
        wants_top_p = [p.top_p < 1.0 and not g for p, g in zip(params, greedy, strict=True)]
        need_min_p = any(p.min_p > 0.0 and not g for p, g in zip(params, greedy, strict=True))
        sort_rows = [i for i in range(batch) if wants_top_k[i] or wants_top_p[i]]

        def f32(values: list[float]) -> torch.Tensor:
            return to_device(values, torch.float32, device)

        out = cls(
            vocab_size=vocab_size,
            temperatures=f32([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]).view(
                -1, 1
            ),
            top_ps=f32([p.top_p for p in params]),
            top_ks=to_device(top_ks, torch.int64, device),
            min_ps=f32([p.min_p for p in params]),
            is_greedy=greedy,
            greedy_mask=to_device(greedy, torch.bool, device),
            is_all_greedy=all(greedy),
            need_top_k=any(wants_top_k),
            need_top_p=any(wants_top_p),
            need_min_p=need_min_p,
            generators=list(generators),
        )
        if 0 < len(sort_rows) < batch:
            out.sort_rows = to_device(sort_rows, torch.int64, device)

        if any(p.repetition_penalty != 1.0 for p in params):
            out.repetition_penalties = f32([p.repetition_penalty for p in params])
            seen = [list(a) + list(b) for a, b in zip(prompt_ids, output_ids, strict=True)]
            out.seen_tokens = build_token_counts(seen, vocab_size, device) > 0
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            out.frequency_penalties = f32([p.frequency_penalty for p in params])
            out.presence_penalties = f32([p.presence_penalty for p in params])
            out.output_counts = build_token_counts(output_ids, vocab_size, device)
        active = [len(o) < p.min_new_tokens for p, o in zip(params, output_ids, strict=True)]
        if any(active):
            out.num_output_tokens = torch.tensor(
                [len(o) for o in output_ids], dtype=torch.int64, device=device
            )
            out.min_new_tokens = torch.tensor(
                [p.min_new_tokens for p in params], dtype=torch.int64, device=device
            )
            out.min_new_stop_ids = [
                sorted(set(eos_token_ids) | set(p.stop_token_ids or [])) if act else []
                for p, act in zip(params, active, strict=True)
            ]
        if any(p.logit_bias for p in params):
            biases = [{int(k): float(v) for k, v in (p.logit_bias or {}).items()} for p in params]
            out.logit_bias = SparseLogitBias.from_dicts(biases, device)
        return out


@dataclass
class SampleOutput:
    """Result of one sampling step."""

    next_token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor  # float32 [B]: raw log_softmax (before penalties/temperature) at the token
    top_logprobs: list[list[tuple[float, int]]] | None  # per row top-N (logprob, token id); None if no N > 0


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Apply the batch's penalties IN PLACE (repetition, frequency/presence, min_new_tokens, bias)."""
    if batch.repetition_penalties is not None and batch.seen_tokens is not None:
        apply_repetition_penalty(logits, batch.seen_tokens, batch.repetition_penalties)
    if (
        batch.output_counts is not None
        and batch.frequency_penalties is not None
        and batch.presence_penalties is not None
    ):
        apply_frequency_presence(
            logits, batch.output_counts, batch.frequency_penalties, batch.presence_penalties
        )
    if (
        batch.min_new_stop_ids is not None
        and batch.num_output_tokens is not None
        and batch.min_new_tokens is not None
    ):
        apply_min_new_tokens(logits, batch.num_output_tokens, batch.min_new_tokens, batch.min_new_stop_ids)
    if batch.logit_bias is not None:
        apply_logit_bias(logits, batch.logit_bias)
    return logits


def process_logits_for_sampling(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p (HF warper order); returns probabilities ``[B, V]``.

    Each filter sees the distribution renormalised after the previous one, as in HF's chain of
    ``TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> MinPLogitsWarper``.
    Filtered tokens get probability exactly 0; the most likely token is never filtered. Penalties
    are NOT applied here (see ``apply_penalties``). The input is not modified.
    """
    scaled = logits.float() / batch.temperatures  # a new tensor
    if batch.need_top_k or batch.need_top_p:
        rows = batch.sort_rows
        sub = scaled if rows is None else scaled.index_select(0, rows)
        sub = _filter_top_k_top_p(
            sub,
            batch.top_ks if rows is None else batch.top_ks.index_select(0, rows),
            batch.top_ps if rows is None else batch.top_ps.index_select(0, rows),
            batch.need_top_k,
            batch.need_top_p,
        )
        if rows is None:
            scaled = sub
        else:
            scaled.index_copy_(0, rows, sub)
    probs = torch.softmax(scaled, dim=-1)
    if batch.need_min_p:
        # The threshold is relative to the row maximum, which top-k/top-p never remove, so min-p
        # needs no sort and is unaffected by their renormalisation.
        threshold = batch.min_ps.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs.masked_fill_(probs < threshold, 0.0)
        probs.div_(probs.sum(dim=-1, keepdim=True))
    return probs


def _filter_top_k_top_p(
    scaled: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, do_top_k: bool, do_top_p: bool
) -> torch.Tensor:
    """Logits with tokens outside top-k, then outside top-p of the survivors, set to ``-inf``."""
    neg_inf = float("-inf")
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
    if do_top_k:
        ranks = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)
        sorted_logits.masked_fill_(ranks.unsqueeze(0) >= top_ks.unsqueeze(1), neg_inf)
    if do_top_p:
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p; rows with top_p == 1 keep everything
        # (rounding in the cumsum must not trim their tail).
        top_ps = top_ps.unsqueeze(1)
        sorted_logits.masked_fill_((mass_before >= top_ps) & (top_ps < 1.0), neg_inf)
    return torch.empty_like(scaled).scatter_(1, sorted_idx, sorted_logits)


def fused_sampling_applies(logits: torch.Tensor, batch: SamplingBatch) -> bool:
    """The one-pass Triton draw (Gumbel-max over ``logits / temperature``, the same distribution as
    the exponential race) serves batches on CUDA with only temperatures to apply: no top-k, top-p
    or min-p filter and no seeded row (those keep their own generator's stream)."""
    return (
        not (batch.need_top_k or batch.need_top_p or batch.need_min_p)
        and all(g is None for g in batch.generators)
        and logits.shape[0] * logits.shape[1] < 2**31
        and use_fused(logits)
    )


class Sampler:
    """Stateless batched sampler; see the module docstring for the order of operations."""

    def __call__(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        top_logprobs_nums: Sequence[int] | None = None,
        need_logprobs: bool = True,
    ) -> SampleOutput:
        """Choose one token per row of ``logits [B, V]`` (not modified).

        ``top_logprobs_nums[i]`` asks for row ``i``'s N most likely tokens under the raw
        distribution. Costs one device-to-host copy only when top logprobs are asked for.
        ``need_logprobs=False`` (no row returns logprobs) skips the chosen tokens' logprobs, whose
        log-sum-exp is several passes over the float32 logits (~0.4 ms per step at batch 256 with
        a 128k vocabulary on an H100); ``logprobs`` is then all NaN.
        """
        if logits.dim() != 2 or logits.shape[0] != batch.batch_size:
            raise ValueError(f"logits must be [B={batch.batch_size}, V], got {tuple(logits.shape)}")
        want_top = top_logprobs_nums is not None and any(n > 0 for n in top_logprobs_nums)
        # Argmax and the one-pass draw read the model dtype as is (the same values); logprobs and
        # penalties work on a float32 copy.
        raw = logits.float() if want_top or need_logprobs or batch.has_penalties else logits
        top_logprobs = None
        if want_top and top_logprobs_nums is not None:
            top_logprobs = top_k_logprobs(compute_logprobs(raw), top_logprobs_nums)

        work = apply_penalties(raw.clone(), batch) if batch.has_penalties else raw
        if batch.is_all_greedy:
            next_ids = torch.argmax(work, dim=-1)
        else:
            greedy_ids = torch.argmax(work, dim=-1) if any(batch.is_greedy) else None
            next_ids = self._sample(work, batch, greedy_ids)

        if need_logprobs:
            chosen = raw.gather(1, next_ids.unsqueeze(1)).squeeze(1) - torch.logsumexp(raw, dim=-1)
        else:
            chosen = torch.full((batch.batch_size,), float("nan"), dtype=torch.float32, device=raw.device)
        return SampleOutput(next_token_ids=next_ids, logprobs=chosen, top_logprobs=top_logprobs)

    @staticmethod
    def _sample(work: torch.Tensor, batch: SamplingBatch, greedy_ids: torch.Tensor | None) -> torch.Tensor:
        """Draw tokens for the non-greedy rows; greedy rows keep ``greedy_ids`` (None: no greedy rows)."""
        if fused_sampling_applies(work, batch):
            from sglang.engine.layers.fused import triton_ops

            # One pass over the logits instead of ~10 (temperature, softmax, the race's noise,
            # division, argmax): ~0.7 ms per step at batch 256 with a 128k vocabulary on an H100.
            seed = int(torch.randint(2**31 - 1, (1,)).item())  # the global CPU RNG: no GPU sync
            sampled = triton_ops.sample_with_temperature(work, 1.0 / batch.temperatures, seed)
            return sampled if greedy_ids is None else torch.where(batch.greedy_mask, greedy_ids, sampled)
        probs = process_logits_for_sampling(work, batch)
        race = torch.empty_like(probs)
        seeded = [
            (row, gen)
            for row, (greedy, gen) in enumerate(zip(batch.is_greedy, batch.generators, strict=True))
            if gen is not None and not greedy
        ]
        if len(seeded) < batch.batch_size:
            race.exponential_()  # unseeded rows: one call on the global RNG
        for row, gen in seeded:
            race[row].exponential_(generator=gen)
        # q == 0 would turn a filtered token's 0/0 into NaN, which argmax would pick.
        race.clamp_(min=torch.finfo(race.dtype).tiny)
        sampled = probs.div_(race).argmax(dim=-1)
        return sampled if greedy_ids is None else torch.where(batch.greedy_mask, greedy_ids, sampled)
