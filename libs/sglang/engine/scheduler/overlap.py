"""Overlap scheduling (SGLang's "zero-overhead" scheduler): while the GPU runs batch N+1, the CPU
turns batch N's sampled tokens into outputs.

A batch is launched, sampled on the device, and its tokens are copied to pinned host memory
without waiting; the batch becomes *in flight*. Each of its requests records a pending future
(its row in the batch) in ``Request.pending_futures``, so the two counters already count the
unseen token (``num_known`` includes it) and the next decode batch can be scheduled at once: its
input token for such a request is a placeholder ``-(row + 1)`` that the model runner replaces on
the device with the in-flight batch's sampled token. Only then does the CPU wait for batch N's
tokens (long done by then) and append them; a request that finished at N (EOS, stop string) was
already part of N+1, whose extra token for it is dropped.

Prefill (extend) batches take part too: a prompt's last chunk samples its first token like a
decode step, and a chunk that does not sample only needs its pages handed to the prefix cache,
which the host can do at launch (the GPU runs the batches in order, so a later batch that reuses
those pages reads them after they are written). Prompt logprobs keep an extend batch synchronous.

Only plain requests take part (no grammar, penalties, min_new_tokens or top logprobs, which need
every token on the host before the next step); anything else, and any step that might retract,
first resolves the batch in flight (see ``Scheduler._may_run_ahead``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglang.engine.runner.forward_batch import ForwardMode

if TYPE_CHECKING:
    from sglang.engine.scheduler.batch import ScheduledBatch
    from sglang.engine.scheduler.request import Request


@dataclass
class InflightBatch:
    """A sampled batch whose tokens have not been read on the host yet."""

    reqs: list[Request]  # in sampling order; row i sampled reqs[i]
    next_ids: torch.Tensor  # [n] int64 on the device: what placeholders resolve to
    host_ids: torch.Tensor  # [n] int64, filled by an async copy
    host_logprobs: torch.Tensor  # [n] float32
    copied: torch.cuda.Event | None  # the device-to-host copy's completion (None on CPU)

    @classmethod
    def launch(cls, reqs: list[Request], next_ids: torch.Tensor, logprobs: torch.Tensor) -> InflightBatch:
        for i, r in enumerate(reqs):
            r.pending_futures.append(i)
        if next_ids.device.type != "cuda":
            return cls(reqs, next_ids, next_ids, logprobs, None)
        host_ids = torch.empty(next_ids.shape, dtype=next_ids.dtype, pin_memory=True)
        host_lps = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
        host_ids.copy_(next_ids, non_blocking=True)
        host_lps.copy_(logprobs, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(reqs, next_ids, host_ids, host_lps, event)

    def wait(self) -> tuple[list[int], list[float]]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_ids.tolist(), self.host_logprobs.tolist()


def plain_decode(req: Request) -> bool:
    """True when ``req``'s next token can be sampled without its previous one on the host."""
    p = req.params
    return (
        req.grammar is None
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and p.repetition_penalty == 1.0
        and len(req.output_ids) + len(req.pending_futures) >= p.min_new_tokens
        and not (req.return_logprob and req.top_logprobs_num > 0)
    )


def overlappable(batch: ScheduledBatch) -> bool:
    """Decode: every request plain. Extend: every request that samples plain, and no prompt
    logprobs (they are read from the logits on the host)."""
    if batch.mode is ForwardMode.DECODE:
        return all(e.samples and e.num_tokens == 1 and plain_decode(e.req) for e in batch.entries)
    return all(not e.logprob_positions and (not e.samples or plain_decode(e.req)) for e in batch.entries)
