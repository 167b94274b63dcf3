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
    assert pool.buffer.shape == (5, 2, 2, 2, 3, 5) and pool.buffer.is_contiguous()
    assert pool.nbytes == 5 * 2 * 2 * 2 * 3 * 5 * 4
    assert pool.page_bytes_all_layers == 2 * 2 * 2 * 3 * 5 * 4 == 2 * KVPool.bytes_per_token(2, 3, 5, torch.float32)
    k = torch.randn(3, 3, 5)
    v = torch.randn(3, 3, 5)
    loc = torch.tensor([2, 3, 7])  # page 1 offsets 0 and 1, page 3 offset 1
    pool.set_kv(1, loc, k, v)
    # exact placement in the page-major tensor: [page, layer, k/v, offset]
    assert torch.equal(pool.buffer[1, 1, 0], k[:2]) and torch.equal(pool.buffer[1, 1, 1], v[:2])
    assert torch.equal(pool.buffer[3, 1, 0, 1], k[2]) and torch.equal(pool.buffer[3, 1, 1, 1], v[2])
    assert torch.count_nonzero(pool.buffer) == 2 * 3 * 3 * 5  # nothing else written
    kb, vb = pool.get_kv(1)
    assert kb.shape == vb.shape == (5, 2, 3, 5)
    assert torch.equal(kb[loc // 2, loc % 2], k) and torch.equal(vb[loc // 2, loc % 2], v)
    assert kb.stride() == vb.stride() and pool.kv_strides() == kb.stride()[:3] == (2 * 2 * 2 * 3 * 5, 15, 5)
    assert kb.data_ptr() - pool.buffer.data_ptr() == 2 * 2 * 3 * 5 * 4  # layer 1's K starts one layer in
    gk, gv = pool.gather_kv(1, torch.tensor([7, 2, 4]))
    assert torch.equal(gk, torch.stack([k[2], k[0], torch.zeros(3, 5)]))
    assert torch.equal(gv, torch.stack([v[2], v[0], torch.zeros(3, 5)]))
    assert pool.token_rows(torch.tensor([0, 1, 2, 7])).tolist() == [0, 1, 8, 25]  # page * L*2*page_size + offset
    assert torch.count_nonzero(pool.get_kv(0)[0]) == 0
    assert KVPool.bytes_per_token(2, 3, 5, torch.bfloat16) == 2 * 2 * 3 * 5 * 2


def test_kv_pool_page_size_one_addresses_pages_directly() -> None:
    pool = KVPool(num_pages=6, page_size=1, num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16, device="cpu")
    k = torch.randn(2, 2, 4).to(torch.bfloat16)
    pool.set_kv(2, torch.tensor([6, 1]), k, -k)
    assert torch.equal(pool.buffer[6, 2, 0, 0], k[0]) and torch.equal(pool.buffer[1, 2, 1, 0], -k[1])
    assert torch.equal(pool.gather_kv(2, torch.tensor([1, 6]))[0], k.flip(0))
    assert torch.count_nonzero(pool.buffer[:, :2]) == 0 and torch.count_nonzero(pool.buffer[[0, 2, 3, 4, 5]]) == 0


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
    # The host-side slot (decode batches) equals the table's, position by position.
    assert [kv.slot(r1, p) for p in range(3 * page_size + 1)] == expect
    assert kv.slot(r2, 0) == kv.slots(r2, 0, 1).item() == 4 * page_size
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


def test_req_to_token_writes_are_staged_and_applied_in_order() -> None:
    """Writes wait on the host until the table is read or flushed, then land together; a write that
    overlaps a staged one flushes first, so the later value wins; out-of-range writes are refused."""
    t = ReqToTokenPool(max_reqs=3, max_context_len=8, device="cpu")
    t.write(0, 0, [11, 12, 13])
    t.write(1, 4, torch.tensor([21, 22]))
    t.write(0, 3, [14])  # adjacent, no overlap: stays staged
    assert t._table.sum() == 0  # nothing applied yet
    t.write(0, 2, [99, 15])  # overlaps token 2 of the first write: flush, then stage
    assert t._table[0, :4].tolist() == [11, 12, 13, 14]
    assert t.table[0, :5].tolist() == [11, 12, 99, 15, 0]  # reading applies the rest
    assert t.table[1].tolist() == [0, 0, 0, 0, 21, 22, 0, 0]
    for row, start, n in [(3, 0, 1), (0, 7, 2), (0, -1, 1)]:
        with pytest.raises(ValueError, match="outside the table"):
            t.write(row, start, list(range(n)))
    t.flush()
    t.flush()  # nothing staged: a no-op
    assert t.table[2].tolist() == [0] * 8
