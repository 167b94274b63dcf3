"""Sampler: greedy equals argmax, seeded reproducibility, distribution goodness of fit."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare
from sglang.engine.sampling import (
    SampleOutput,
    Sampler,
    SamplingBatch,
    SamplingParams,
    process_logits_for_sampling,
)

pytestmark = pytest.mark.unit

V = 32
EOS = [0]


def _build(
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    vocab: int = V,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[]] * n,
        outputs if outputs is not None else [[]] * n,
        EOS,
        vocab,
        "cpu",
        generators if generators is not None else [None] * n,
    )


def _logits(batch: int, seed: int, vocab: int = V) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_greedy_equals_argmax() -> None:
    logits = _logits(6, seed=0)
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(top_k=1, temperature=0.8)] * 3
    out = Sampler()(logits, _build(params))
    assert out.next_token_ids.dtype == torch.int64
    assert torch.equal(out.next_token_ids, logits.argmax(dim=-1))


def test_greedy_with_penalties_is_argmax_of_penalised_logits() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 3.0
    logits[0, 6] = 2.0
    # 5 was generated; repetition 2.0 -> 1.5 < 2.0, so 6 wins.
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    out = Sampler()(logits, _build(params, outputs=[[5]]))
    assert out.next_token_ids.tolist() == [6]
    # logprob is of the RAW distribution, not the penalised one.
    assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(logits, -1)[0, 6].item(), abs=1e-6)


def test_min_new_tokens_blocks_eos_in_greedy() -> None:
    logits = torch.zeros(2, V)
    logits[:, EOS[0]] = 10.0
    params = [SamplingParams(temperature=0.0, min_new_tokens=3)] * 2
    out = Sampler()(logits, _build(params, outputs=[[4, 4], [4, 4, 4]]))
    assert out.next_token_ids[0].item() != EOS[0]
    assert out.next_token_ids[1].item() == EOS[0]


def test_logprobs_and_top_logprobs_are_raw() -> None:
    logits = _logits(3, seed=1)
    params = [SamplingParams(temperature=0.5, frequency_penalty=1.0), SamplingParams(temperature=0.0)] + [
        SamplingParams(top_k=2)
    ]
    out = Sampler()(logits, _build(params, outputs=[[1], [2], [3]]), top_logprobs_nums=[3, 0, 1])
    ref = torch.log_softmax(logits.double(), dim=-1)
    expected = ref.gather(1, out.next_token_ids.unsqueeze(1)).squeeze(1)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs.double(), expected, rtol=0, atol=1e-5)
    assert out.top_logprobs is not None
    assert [len(r) for r in out.top_logprobs] == [3, 0, 1]
    top3 = ref[0].topk(3)
    assert [t for _, t in out.top_logprobs[0]] == top3.indices.tolist()
    for (val, _), exp in zip(out.top_logprobs[0], top3.values.tolist(), strict=True):
        assert val == pytest.approx(exp, abs=1e-5)
    assert out.top_logprobs[2][0][1] == int(logits[2].argmax())


def test_top_logprobs_none_when_not_asked() -> None:
    logits = _logits(2, seed=2)
    batch = _build([SamplingParams()] * 2)
    assert Sampler()(logits, batch).top_logprobs is None
    assert Sampler()(logits, batch, top_logprobs_nums=[0, 0]).top_logprobs is None


def test_logits_not_modified() -> None:
    logits = _logits(2, seed=3)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, logit_bias={3: 5.0})] * 2
    Sampler()(logits, _build(params, outputs=[[1, 2], [3]]))
    assert torch.equal(logits, before)


def _draw_sequence(seed: int, steps: int, neighbours: int, neighbour_seed: int) -> list[int]:
    """Draw ``steps`` tokens for one seeded request placed among ``neighbours`` other rows."""
    gen = torch.Generator().manual_seed(seed)
    logits_gen = torch.Generator().manual_seed(1234)  # same logits every run
    noise_gen = torch.Generator().manual_seed(neighbour_seed)
    sampler = Sampler()
    drawn: list[int] = []
    for _ in range(steps):
        own = torch.randn(1, V, generator=logits_gen)
        others = torch.randn(neighbours, V, generator=noise_gen)
        logits = torch.cat([others[: neighbours // 2], own, others[neighbours // 2 :]])
        row = neighbours // 2
        params = [SamplingParams(temperature=0.9, top_p=0.9, seed=7)] + [
            SamplingParams(temperature=1.2, top_k=5)
        ] * neighbours
        params.insert(row, params.pop(0))
        gens: list[torch.Generator | None] = [None] * (neighbours + 1)
        gens[row] = gen
        if neighbours:
            gens[0 if row else 1] = torch.Generator().manual_seed(99)  # a seeded neighbour too
        out = sampler(logits, _build(params, generators=gens))
        drawn.append(int(out.next_token_ids[row]))
    return drawn


@pytest.mark.parametrize("temps", [(0.0, 0.0), (0.7, 1.3), (0.0, 0.9)])
def test_skipped_logprobs_change_no_token(temps: tuple[float, float]) -> None:
    """``need_logprobs=False`` (no request asked for them): the same tokens from the same seeds
    (greedy, sampled and mixed batches), and NaN logprobs instead of values nobody reads."""
    logits = _logits(2, seed=9)
    params = [SamplingParams(temperature=t, seed=s) for t, s in zip(temps, (21, 22), strict=True)]

    def draw(need: bool) -> SampleOutput:
        gens: list[torch.Generator | None] = [torch.Generator().manual_seed(s) for s in (21, 22)]
        return Sampler()(logits, _build(params, generators=gens), need_logprobs=need)

    with_lp, without = draw(True), draw(False)
    assert torch.equal(with_lp.next_token_ids, without.next_token_ids)
    assert bool(torch.isfinite(with_lp.logprobs).all())
    assert without.logprobs.shape == (2,) and bool(torch.isnan(without.logprobs).all())


def test_seeded_request_is_reproducible() -> None:
    first = _draw_sequence(seed=7, steps=50, neighbours=0, neighbour_seed=0)
    second = _draw_sequence(seed=7, steps=50, neighbours=0, neighbour_seed=0)
    assert first == second
    assert len(set(first)) > 1  # actually sampling, not collapsing to argmax
    assert _draw_sequence(seed=8, steps=50, neighbours=0, neighbour_seed=0) != first


def test_seeded_request_ignores_batch_neighbours() -> None:
    alone = _draw_sequence(seed=7, steps=50, neighbours=0, neighbour_seed=0)
    torch.manual_seed(1)
    crowded = _draw_sequence(seed=7, steps=50, neighbours=5, neighbour_seed=1)
    torch.manual_seed(2)
    other_crowd = _draw_sequence(seed=7, steps=50, neighbours=2, neighbour_seed=2)
    assert crowded == alone
    assert other_crowd == alone


def test_seeded_draw_equals_torch_multinomial_with_same_generator() -> None:
    """The exponential race draws exactly what torch.multinomial(probs, 1, generator) draws."""
    logits = _logits(3, seed=5)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s) for s in (11, 12, 13)]
    gens: list[torch.Generator | None] = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    batch = _build(params, generators=gens)
    probs = process_logits_for_sampling(logits, batch)
    ref_gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    sampler = Sampler()
    for _ in range(30):
        got = sampler(logits, batch).next_token_ids.tolist()
        expected = [int(torch.multinomial(probs[i], 1, generator=ref_gens[i])) for i in range(3)]
        assert got == expected


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = _logits(4, seed=4)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=5.0)] * 2
    torch.manual_seed(0)
    draws = [Sampler()(logits, _build(params)).next_token_ids for _ in range(20)]
    greedy = logits.argmax(dim=-1)
    for d in draws:
        assert d[0] == greedy[0] and d[2] == greedy[2]
    assert len({int(d[1]) for d in draws}) > 1  # temperature 5 spreads row 1


# --------------------------------------------------------------------------- goodness of fit

FIT_LOGITS = [2.0, 1.6, 1.3, 0.9, 0.4, -0.3, -1.0, -2.0]


def _reference_probs(
    logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> list[float]:
    """HF warper semantics in float64 Python: each filter sees the renormalised survivors."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])

    def softmax(keep: set[int]) -> dict[int, float]:
        m = max(scaled[i] for i in keep)
        e = {i: math.exp(scaled[i] - m) for i in keep}
        total = sum(e.values())
        return {i: v / total for i, v in e.items()}

    keep = set(order[:top_k]) if top_k > 0 else set(order)
    if top_p < 1.0:
        probs, mass, kept = softmax(keep), 0.0, set()
        for i in (i for i in order if i in keep):
            if mass < top_p:
                kept.add(i)
            mass += probs[i]
        keep = kept
    if min_p > 0.0:
        probs = softmax(keep)
        top = max(probs.values())
        keep = {i for i in keep if probs[i] >= min_p * top}
    final = softmax(keep)
    return [final.get(i, 0.0) for i in range(len(logits))]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p", "n_kept"),
    [
        (0.7, -1, 1.0, 0.0, 8),
        (1.0, 3, 1.0, 0.0, 3),
        (1.0, -1, 0.8, 0.0, 4),
        (1.0, -1, 1.0, 0.1, 6),
        (0.7, 3, 0.8, 0.1, 2),
    ],
)
def test_distribution_goodness_of_fit(
    temperature: float, top_k: int, top_p: float, min_p: float, n_kept: int
) -> None:
    draws = 20000
    expected_probs = _reference_probs(FIT_LOGITS, temperature, top_k, top_p, min_p)
    kept = [i for i, p in enumerate(expected_probs) if p > 0]
    assert len(kept) == n_kept  # the case exercises the filter it is meant to

    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] * draws
    logits = torch.tensor([FIT_LOGITS]).expand(draws, -1).contiguous()
    torch.manual_seed(0)
    out: SampleOutput = Sampler()(logits, _build(params, vocab=len(FIT_LOGITS)))
    counts = torch.bincount(out.next_token_ids, minlength=len(FIT_LOGITS)).tolist()

    filtered = [i for i in range(len(FIT_LOGITS)) if i not in kept]
    assert all(counts[i] == 0 for i in filtered), f"filtered tokens drawn: {counts}"
    observed = [counts[i] for i in kept]
    expected = [expected_probs[i] * draws for i in kept]
    result = chisquare(observed, expected)
    assert result.pvalue > 1e-3, f"observed {observed} vs expected {expected}"
