"""Drive a model by hand through the paged KV cache, without scheduler or runner.

``run_prefill`` packs several requests into one batch, gives them shuffled (non-contiguous) KV
pages, and returns each request's per-token logits. With ``prefix_split`` it runs three forwards
instead of one: the prefixes (EXTEND), the rest but the last token on top of them (EXTEND with
prefix_lens > 0), then the last token of every request (DECODE).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from sglang.engine.attention import create_backend
from sglang.engine.memory import KVPool, PageAllocator, ReqToTokenPool
from sglang.engine.runner.forward_batch import ForwardBatch, ForwardMode


def _forward(
    model: Any,
    mode: ForwardMode,
    reqs: list[tuple[int, int, int]],  # (request index, start, end) of the tokens computed now
    input_ids_list: list[list[int]],
    rows: list[int],
    slots: list[torch.Tensor],
    pools: tuple[KVPool, ReqToTokenPool],
    backend: Any,
    device: torch.device,
) -> list[torch.Tensor]:
    kv_pool, req_to_token = pools
    ids = [t for i, s, e in reqs for t in input_ids_list[i][s:e]]
    pos = [p for _, s, e in reqs for p in range(s, e)]
    batch = ForwardBatch(
        mode=mode,
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(pos, dtype=torch.int64, device=device),
        req_pool_indices=torch.tensor([rows[i] for i, _, _ in reqs], dtype=torch.int64, device=device),
        seq_lens=torch.tensor([e for _, _, e in reqs], dtype=torch.int64, device=device),
        out_cache_loc=torch.cat([slots[i][s:e] for i, s, e in reqs]).to(device),
        prefix_lens_cpu=[s for _, s, _ in reqs],
        extend_lens_cpu=[e - s for _, s, e in reqs],
        kv_pool=kv_pool,
        req_to_token=req_to_token,
        attn_backend=backend,
    )
    backend.init_forward_metadata(batch)
    with torch.inference_mode():
        hidden = model(batch.input_ids, batch.positions, batch)
        logits = model.compute_logits(hidden).float()
    return list(torch.split(logits, batch.extend_lens_cpu))


def run_prefill(
    model: Any,
    model_info: Any,
    input_ids_list: list[list[int]],
    page_size: int,
    backend: str = "torch_native",
    prefix_split: list[int] | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per-request float32 logits ``[len(ids), vocab]`` for every token of every request.

    ``prefix_split[i]`` (``0 <= p < len(ids_i)``) is request i's prefix length for the two-phase
    path; requests whose phase would be empty are left out of that forward.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lens = [len(x) for x in input_ids_list]
    if min(lens) < 1:
        raise ValueError("every request needs at least one token")
    pages_per_req = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per_req) + 3  # a few spare pages stay unused
    kv_pool = KVPool(
        num_pages, page_size, model_info.num_layers, model_info.num_kv_heads, model_info.head_dim, dtype, device
    )
    allocator = PageAllocator(num_pages, page_size)
    req_to_token = ReqToTokenPool(len(lens) + 1, max(lens) + page_size, device)
    attn = create_backend(backend)

    pages = allocator.alloc(sum(pages_per_req))
    random.Random(seed).shuffle(pages)
    rows, slots = [], []
    for n, k in zip(lens, pages_per_req, strict=True):
        mine, pages = pages[:k], pages[k:]
        req_slots = torch.tensor(
            [p * page_size + off for p in mine for off in range(page_size)], dtype=torch.int64
        )[:n]
        row = req_to_token.alloc()
        req_to_token.write(row, 0, req_slots)
        rows.append(row)
        slots.append(req_slots)

    def run(mode: ForwardMode, reqs: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        return _forward(model, mode, reqs, input_ids_list, rows, slots, (kv_pool, req_to_token), attn, device)

    if prefix_split is None:
        return run(ForwardMode.EXTEND, [(i, 0, n) for i, n in enumerate(lens)])

    if len(prefix_split) != len(lens) or any(not 0 <= p < n for p, n in zip(prefix_split, lens, strict=True)):
        raise ValueError(f"prefix_split {prefix_split} must have 0 <= p < len for lens {lens}")
    parts: list[list[torch.Tensor]] = [[] for _ in lens]
    phases = [
        (ForwardMode.EXTEND, [(i, 0, p) for i, p in enumerate(prefix_split) if p > 0]),
        (ForwardMode.EXTEND, [(i, p, n - 1) for i, (p, n) in enumerate(zip(prefix_split, lens, strict=True)) if n - 1 > p]),
        (ForwardMode.DECODE, [(i, n - 1, n) for i, n in enumerate(lens)]),
    ]
    for mode, reqs in phases:
        if reqs:
            for (i, _, _), out in zip(reqs, run(mode, reqs), strict=True):
                parts[i].append(out)
    return [torch.cat(p) for p in parts]
