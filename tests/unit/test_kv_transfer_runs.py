"""Coalescing of page lists into runs for fewer, larger NIXL writes."""

from __future__ import annotations

import pytest

pytest.importorskip("nixl")

from sglang.kv_transfer.nixl_sender import _runs  # noqa: E402

pytestmark = pytest.mark.unit


def test_runs_split_where_either_side_breaks() -> None:
    assert _runs([1, 2, 3, 7, 8], [10, 11, 12, 13, 14]) == [(1, 10, 3), (7, 13, 2)]
    assert _runs([1, 2, 3], [5, 9, 10]) == [(1, 5, 1), (2, 9, 2)]
    assert _runs([4], [4]) == [(4, 4, 1)]
    assert _runs([], []) == []
    assert _runs(list(range(1, 257)), list(range(300, 556))) == [(1, 300, 256)]
