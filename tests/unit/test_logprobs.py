"""Logprob helpers against an independent float64 log_softmax."""

from __future__ import annotations

import pytest
import torch
from sglang.engine.sampling import compute_logprobs, gather_token_logprobs, top_k_logprobs

pytestmark = pytest.mark.unit


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4.0


def _reference(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def test_compute_logprobs_matches_float64() -> None:
    logits = _logits(5, 1000, seed=0)
    lp = compute_logprobs(logits)
    assert lp.dtype == torch.float32 and lp.shape == logits.shape
    torch.testing.assert_close(lp.double(), _reference(logits), rtol=0, atol=1e-5)


def test_compute_logprobs_upcasts_half_precision() -> None:
    logits = _logits(2, 50, seed=1).to(torch.bfloat16)
    lp = compute_logprobs(logits)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), _reference(logits.float()), rtol=0, atol=1e-5)


def test_gather_token_logprobs() -> None:
    logits = _logits(4, 100, seed=2)
    ids = torch.tensor([0, 99, 42, 42])
    got = gather_token_logprobs(compute_logprobs(logits), ids)
    ref = _reference(logits)
    assert got.shape == (4,)
    for i, tok in enumerate(ids.tolist()):
        assert got[i].item() == pytest.approx(ref[i, tok].item(), abs=1e-5)


def test_prompt_logprobs_shift() -> None:
    """Logprob of prompt token t+1 comes from the logits at position t."""
    input_ids = torch.tensor([5, 17, 3, 8])
    logits = _logits(4, 20, seed=3)
    got = gather_token_logprobs(compute_logprobs(logits[:-1]), input_ids[1:])
    ref = _reference(logits)
    expected = [ref[t, int(input_ids[t + 1])].item() for t in range(3)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_top_k_logprobs_order_and_values() -> None:
    logits = torch.tensor(
        [
            [0.0, 3.0, 1.0, 2.0, -1.0],
            [5.0, 4.0, 3.0, 2.0, 1.0],
            [1.0, 1.5, 0.5, 2.5, 0.0],
        ]
    )
    lp = compute_logprobs(logits)
    out = top_k_logprobs(lp, [3, 0, 5])
    assert [[tok for _, tok in row] for row in out] == [[1, 3, 2], [], [3, 1, 0, 2, 4]]
    ref = _reference(logits)
    for row, pairs in enumerate(out):
        values = [v for v, _ in pairs]
        assert values == sorted(values, reverse=True)
        for value, tok in pairs:
            assert isinstance(tok, int) and isinstance(value, float)
            assert value == pytest.approx(ref[row, tok].item(), abs=1e-5)


def test_top_k_logprobs_edge_cases() -> None:
    lp = compute_logprobs(_logits(2, 4, seed=4))
    assert top_k_logprobs(lp, [0, 0]) == [[], []]
    clipped = top_k_logprobs(lp, [10, 1])  # more than the vocabulary: all tokens
    assert len(clipped[0]) == 4 and len(clipped[1]) == 1
    assert sorted(tok for _, tok in clipped[0]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="ks has 1 entries for 2 rows"):
        top_k_logprobs(lp, [1])
