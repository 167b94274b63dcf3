"""How many KV splits the Triton decode kernel uses per batch size, and the scratch that covers them."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from sglang.engine.attention.triton.decode import pick_num_splits, scratch_rows  # noqa: E402

pytestmark = pytest.mark.unit


def test_splits_on_an_h100_for_the_8b_shape() -> None:
    """132 SMs, 8 KV heads: batch 1 spreads over the maximum, big batches stream whole contexts."""
    got = {bs: pick_num_splits(bs, 8, 64, 132) for bs in (1, 2, 4, 8, 16, 64, 128, 256)}
    assert got == {1: 64, 2: 64, 4: 32, 8: 16, 16: 8, 64: 2, 128: 1, 256: 1}


@pytest.mark.parametrize("sms", [4, 132])
@pytest.mark.parametrize("max_splits", [1, 16, 64])
@pytest.mark.parametrize("kvh", [1, 2, 8])
def test_scratch_rows_cover_every_batch(sms: int, max_splits: int, kvh: int) -> None:
    for max_bs in (1, 7, 64, 300):
        rows = scratch_rows(max_bs, max_splits, sms, fixed=False)
        need = max(bs * pick_num_splits(bs, kvh, max_splits, sms) for bs in range(1, max_bs + 1))
        assert need <= rows, (max_bs, need, rows)
        assert scratch_rows(max_bs, max_splits, sms, fixed=True) == max_bs * max_splits


def test_splits_are_powers_of_two_within_bounds() -> None:
    for bs in range(1, 600, 7):
        s = pick_num_splits(bs, 4, 32, 132)
        assert 1 <= s <= 32 and s & (s - 1) == 0
        assert s == 1 or bs * 4 * s <= 8 * 132
