"""Penalties and the warper chain, compared with HF transformers' logits processors."""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch
from sglang.engine.sampling import (
    SamplingBatch,
    SamplingParams,
    SparseLogitBias,
    apply_frequency_presence,
    apply_logit_bias,
    apply_min_new_tokens,
    apply_penalties,
    apply_repetition_penalty,
    build_token_counts,
    process_logits_for_sampling,
)
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

pytestmark = pytest.mark.unit

V = 64
EOS = [1, 2]


def _logits(batch: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=g) * scale


def _token_lists(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (length + i,), generator=g).tolist() for i in range(batch)]


def _build(params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]]) -> SamplingBatch:
    return SamplingBatch.build(params, prompts, outputs, EOS, V, "cpu", [None] * len(params))


def test_build_token_counts_matches_python_count() -> None:
    lists = [[3, 3, 5], [], [0, V - 1, V - 1, V - 1]]
    counts = build_token_counts(lists, V, "cpu")
    assert counts.shape == (3, V) and counts.dtype == torch.int32
    for row, tokens in enumerate(lists):
        expected = torch.zeros(V, dtype=torch.int32)
        for t in tokens:
            expected[t] += 1
        assert torch.equal(counts[row], expected)
    assert torch.equal(build_token_counts([[], []], V, "cpu"), torch.zeros(2, V, dtype=torch.int32))


def test_repetition_penalty_matches_hf() -> None:
    penalties = [1.3, 0.7, 1.0, 2.0]
    prompts = _token_lists(4, 5, seed=1)
    outputs = _token_lists(4, 3, seed=2)
    logits = _logits(4)
    ours = apply_repetition_penalty(
        logits.clone(),
        build_token_counts([p + o for p, o in zip(prompts, outputs, strict=True)], V, "cpu"),
        torch.tensor(penalties),
    )
    for row, pen in enumerate(penalties):
        ids = torch.tensor([prompts[row] + outputs[row]])
        expected = RepetitionPenaltyLogitsProcessor(penalty=pen)(ids, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], expected, rtol=0, atol=1e-6)
    assert not torch.equal(ours[0], logits[0])  # the penalty did something
    torch.testing.assert_close(ours[2], logits[2], rtol=0, atol=0)  # 1.0 is a no-op


def test_repetition_penalty_accepts_bool_mask() -> None:
    logits = torch.tensor([[2.0, -2.0, 4.0]])
    mask = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, mask, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 4.0]]
    assert out is logits  # in place


def test_frequency_presence_matches_openai_formula() -> None:
    outputs = [[4, 4, 4, 9], [], [0, 1, 1], [7]]
    freq = [0.5, 1.0, -0.3, 0.0]
    pres = [0.25, -1.0, 1.5, 2.0]
    logits = _logits(4, seed=3)
    ours = apply_frequency_presence(
        logits.clone(), build_token_counts(outputs, V, "cpu"), torch.tensor(freq), torch.tensor(pres)
    )
    expected = logits.tolist()
    for row, tokens in enumerate(outputs):
        for tok in set(tokens):
            count = tokens.count(tok)
            expected[row][tok] -= freq[row] * count + pres[row] * 1.0
    torch.testing.assert_close(ours, torch.tensor(expected), rtol=0, atol=1e-6)
    assert ours[0, 4].item() == pytest.approx(logits[0, 4].item() - 1.75, abs=1e-6)


def test_min_new_tokens_matches_hf_eos() -> None:
    logits = _logits(3, seed=4)
    num_out = [0, 2, 5]
    min_new = [3, 3, 3]
    ours = apply_min_new_tokens(logits.clone(), torch.tensor(num_out), torch.tensor(min_new), [EOS] * 3)
    for row in range(3):
        proc = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=4, min_new_tokens=3, eos_token_id=EOS)
        ids = torch.zeros(1, 4 + num_out[row], dtype=torch.long)
        expected = proc(ids, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], expected, rtol=0, atol=0)
    assert math.isinf(ours[0, 1].item()) and ours[0, 1].item() < 0
    assert ours[2, 1].item() == logits[2, 1].item()


def test_min_new_tokens_masks_stop_token_ids_too() -> None:
    params = [SamplingParams(min_new_tokens=2, stop_token_ids=[10]), SamplingParams(min_new_tokens=1)]
    batch = _build(params, [[5], [5]], [[7], [7]])
    out = apply_penalties(torch.zeros(2, V), batch)
    assert torch.isneginf(out[0]).nonzero().flatten().tolist() == [1, 2, 10]
    assert not torch.isinf(out[1]).any()  # row 1 already has its 1 token


def test_logit_bias_matches_hf_sequence_bias() -> None:
    biases = [{3: 2.5, 17: -4.0}, {}, {0: 10.0, V - 1: -1.5}]
    logits = _logits(3, seed=5)
    sparse = apply_logit_bias(logits.clone(), SparseLogitBias.from_dicts(biases, "cpu"))
    dense_bias = torch.zeros(3, V)
    for row, bias in enumerate(biases):
        for tok, val in bias.items():
            dense_bias[row, tok] = val
    dense = apply_logit_bias(logits.clone(), dense_bias)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=0)
    for row, bias in enumerate(biases):
        if not bias:
            torch.testing.assert_close(sparse[row], logits[row], rtol=0, atol=0)
            continue
        proc = SequenceBiasLogitsProcessor(sequence_bias=[[[tok], val] for tok, val in bias.items()])
        expected = proc(torch.zeros(1, 3, dtype=torch.long), logits[row : row + 1].clone())
        torch.testing.assert_close(sparse[row : row + 1], expected, rtol=0, atol=1e-6)


def test_apply_penalties_order_matches_hf_chain() -> None:
    """Repetition, then min_new_tokens, then bias, as one HF processor chain would do."""
    params = [
        SamplingParams(repetition_penalty=1.5, min_new_tokens=4, logit_bias={"5": 1.0}),
        SamplingParams(repetition_penalty=0.8, min_new_tokens=0),
    ]
    prompts, outputs = _token_lists(2, 6, seed=6), _token_lists(2, 2, seed=7)
    logits = _logits(2, seed=8)
    ours = apply_penalties(logits.clone(), _build(params, prompts, outputs))
    for row, p in enumerate(params):
        ids = torch.tensor([prompts[row] + outputs[row]])
        x = RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty)(ids, logits[row : row + 1].clone())
        x = MinNewTokensLengthLogitsProcessor(len(prompts[row]), p.min_new_tokens, EOS)(ids, x)
        if p.logit_bias:
            x = SequenceBiasLogitsProcessor([[[int(k)], float(v)] for k, v in p.logit_bias.items()])(ids, x)
        torch.testing.assert_close(ours[row : row + 1], x, rtol=0, atol=1e-6)


def _hf_warped_probs(logits_row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    ids = cast(torch.LongTensor, torch.zeros(1, 1, dtype=torch.long))
    x = TemperatureLogitsWarper(p.temperature)(ids, logits_row.clone())
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0.0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return torch.softmax(x, dim=-1)


WARPER_CASES = [
    [SamplingParams(temperature=0.7)],
    [SamplingParams(top_k=5)],
    [SamplingParams(top_p=0.6)],
    [SamplingParams(min_p=0.2)],
    [SamplingParams(temperature=1.3, min_p=0.05), SamplingParams(temperature=0.5)],
    [
        SamplingParams(temperature=0.7, top_k=10, top_p=0.8, min_p=0.1),
        SamplingParams(temperature=1.5, top_k=3),
        SamplingParams(temperature=0.9, top_p=0.5),
        SamplingParams(temperature=2.0, min_p=0.3),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.4, top_k=40, top_p=0.95),
        SamplingParams(temperature=1.1, top_k=V + 10),  # larger than vocab: off
    ],
]


@pytest.mark.parametrize("params", WARPER_CASES)
def test_warper_chain_matches_hf(params: list[SamplingParams]) -> None:
    logits = _logits(len(params), seed=9)
    batch = _build(params, [[]] * len(params), [[]] * len(params))
    probs = process_logits_for_sampling(logits, batch)
    assert probs.shape == logits.shape
    for row, p in enumerate(params):
        expected = _hf_warped_probs(logits[row : row + 1], p)[0]
        assert torch.equal(probs[row] == 0, expected == 0), f"row {row}: filtered sets differ"
        torch.testing.assert_close(probs[row], expected, rtol=0, atol=1e-6)
        assert probs[row].sum().item() == pytest.approx(1.0, abs=1e-5)
    # Each filter actually removed something where it was asked to.
    for row, p in enumerate(params):
        if p.top_k != -1 and p.top_k < V:
            assert (probs[row] > 0).sum().item() <= p.top_k
        if p.top_p < 1.0 or p.min_p > 0.0:
            assert (probs[row] == 0).any()


def test_warper_does_not_modify_input() -> None:
    logits = _logits(2, seed=10)
    before = logits.clone()
    batch = _build([SamplingParams(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1)] * 2, [[], []], [[], []])
    process_logits_for_sampling(logits, batch)
    assert torch.equal(logits, before)


def test_no_penalties_builds_nothing() -> None:
    batch = _build([SamplingParams(), SamplingParams(temperature=0)], [[1, 2]] * 2, [[3]] * 2)
    assert not batch.has_penalties
    assert batch.seen_tokens is None and batch.output_counts is None and batch.logit_bias is None
    assert batch.top_ks.tolist() == [V, V]
    assert batch.temperatures.flatten().tolist() == [1.0, 1.0]  # greedy row gets neutral 1.0
