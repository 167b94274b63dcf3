"""Page allocator, KV pool and request-to-token table: exact page ids and integrity."""

from __future__ import annotations

import pytest
import torch
from sglang.engine.memory import KVPool, OutOfPagesError, PageAllocator, ReqToTokenPool
from sglang.engine.sampling.params import SamplingParams
from sglang.engine.scheduler.kv_slots import KVSlots
from sglang.engine.scheduler.request import Request

pytestmark = pytest.mark.unit


def test_alloc_free_exact_ids_fifo() -> None:
    a = PageAllocator(num_pages=5, page_size=4)
    assert a.alloc(2) == [1, 2]
    assert a.alloc(1) == [3]
    a.free([2])
    assert a.alloc(3) == [4, 5, 2]
    assert a.num_free == 0
    with pytest.raises(OutOfPagesError):
        a.alloc(1)
    a.check_integrity(in_use=5)
    a.free([1, 3, 4, 5, 2])
    a.check_integrity(in_use=0)
    assert a.alloc(5) == [1, 3, 4, 5, 2]


def test_double_free_and_out_of_range_raise() -> None:
    a = PageAllocator(num_pages=3, page_size=1)
    p = a.alloc(1)
    a.free(p)
    with pytest.raises(ValueError, match="double free"):
        a.free(p)
    with pytest.raises(ValueError, match="out of range"):
        a.free([0])
    with pytest.raises(AssertionError, match="page leak"):
        a.check_integrity(in_use=1)


def test_kv_pool_set_and_read_slots() -> None:
    pool = KVPool(num_pages=4, page_size=2, num_layers=2, num_kv_heads=3, head_dim=5, dtype=torch.float32, device="cpu")
    assert pool.k_buffers[0].shape == (10, 3, 5)
    k = torch.randn(3, 3, 5)
    v = torch.randn(3, 3, 5)
    loc = torch.tensor([2, 3, 7])
    pool.set_kv(1, loc, k, v)
    kb, vb = pool.get_kv(1)
    assert torch.equal(kb[loc], k) and torch.equal(vb[loc], v)
    assert torch.count_nonzero(pool.get_kv(0)[0]) == 0
    assert KVPool.bytes_per_token(2, 3, 5, torch.bfloat16) == 2 * 2 * 3 * 5 * 2


@pytest.mark.parametrize("page_size", [1, 16])
def test_kv_slots_grow_release(page_size: int) -> None:
    alloc = PageAllocator(num_pages=8, page_size=page_size)
    table = ReqToTokenPool(max_reqs=4, max_context_len=8 * page_size, device="cpu")
    kv = KVSlots(alloc, table, None)
    r1 = Request("a", [1, 2, 3], SamplingParams())
    r2 = Request("b", [4], SamplingParams())
    kv.grow(r1, 3 * page_size)
    assert r1.pages == [1, 2, 3]
    kv.grow(r2, 1)
    assert r2.pages == [4]
    kv.grow(r1, 3 * page_size + 1)
    assert r1.pages == [1, 2, 3, 5]
    expect = [p * page_size + o for p in r1.pages for o in range(page_size)][: 3 * page_size + 1]
    assert kv.slots(r1, 0, 3 * page_size + 1).tolist() == expect
    kv.check_integrity([r1, r2])
    kv.release(r1)
    assert r1.pages == [] and r1.row is None
    kv.check_integrity([r2])
    assert alloc.num_free == 7
    kv.release(r2)
    kv.check_integrity([])
    assert table.num_free == 4


def test_req_to_token_rows() -> None:
    t = ReqToTokenPool(max_reqs=2, max_context_len=4, device="cpu")
    r0, r1 = t.alloc(), t.alloc()
    assert (r0, r1) == (0, 1)
    with pytest.raises(RuntimeError, match="max_running_requests"):
        t.alloc()
    t.free(r0)
    with pytest.raises(ValueError):
        t.free(r0)
