"""Decode CUDA-graph batch-size buckets (the capture itself is tested on a GPU)."""

from __future__ import annotations

import pytest
from sglang.engine.runner.cuda_graph import batch_buckets

pytestmark = pytest.mark.unit


def test_buckets_exact() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]
    b = batch_buckets(256)
    assert b[-4:] == [208, 224, 240, 256] and b == sorted(set(b))


@pytest.mark.parametrize("max_bs", [1, 3, 8, 33, 256, 300])
def test_every_batch_fits_a_bucket(max_bs: int) -> None:
    b = batch_buckets(max_bs)
    assert b[-1] == max_bs
    assert all(any(s >= n for s in b) for n in range(1, max_bs + 1))
