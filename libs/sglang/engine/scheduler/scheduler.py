"""Scheduler: continuous batching with chunked prefill and retraction.

One step is schedule → run → grammar mask → sample → update, each with its own output type
(:class:`ScheduledBatch` → ``ModelOutput`` → ``GrammarMask`` → ``SampleOutput`` → the list of
updated requests).
Requests join between steps. A step is either an EXTEND batch (prompt chunks of newly admitted or
partly prefilled requests, bounded by ``chunked_prefill_size``) or a DECODE batch (one token for
every running request). When a decode step cannot get pages, the newest running requests are
retracted to the front of the waiting queue and recomputed later. With overlap scheduling (on
for CUDA), plain decode and prefill steps are launched before the previous step's tokens are read
on the host (engine/scheduler/overlap.py).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

import torch

from sglang.engine.constrained.mask import GrammarMask
from sglang.engine.memory import OutOfPagesError
from sglang.engine.prefix_cache import RadixCache
from sglang.engine.runner.forward_batch import ForwardMode
from sglang.engine.runner.model_runner import ModelInput, ModelRunner
from sglang.engine.sampling.sampler import Sampler, SamplingBatch
from sglang.engine.scheduler.batch import Entry, ScheduledBatch
from sglang.engine.scheduler.disagg import DecodeSide, PrefillSide
from sglang.engine.scheduler.grammar_phase import GrammarPhase
from sglang.engine.scheduler.kv_slots import KVSlots
from sglang.engine.scheduler.output_processor import OutputProcessor
from sglang.engine.scheduler.overlap import InflightBatch, overlappable
from sglang.engine.scheduler.policy import create_policy
from sglang.engine.scheduler.request import FinishReason, Request, Status
from sglang.settings import SchedulerSettings

logger = logging.getLogger(__name__)

# A waiting request that shares at least this many uncached tokens with one computing in the same
# step waits one step, then reuses that prefix from the cache (SGLang's in-batch prefix caching).
IN_BATCH_SHARE_THRESHOLD = 32


class Scheduler:
    """Single-threaded: all methods run on the engine's scheduler thread."""

    def __init__(
        self,
        runner: ModelRunner,
        settings: SchedulerSettings,
        eos_token_ids: list[int],
        cache: RadixCache | None = None,
        pd: PrefillSide | DecodeSide | None = None,
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cache = cache
        self.kv = KVSlots(runner.allocator, runner.req_to_token, cache)
        self.policy = create_policy(settings.schedule_policy)
        self.pd = pd  # prefill/decode disaggregation role, if any
        self.prefill_pd = pd if isinstance(pd, PrefillSide) else None
        self.sampler = Sampler()
        self.outputs = OutputProcessor(eos_token_ids, runner.context_length)
        self.grammar = GrammarPhase(self.outputs, runner.device)
        self.eos_token_ids = eos_token_ids
        self.vocab_size = runner.info.vocab_size
        self._arrivals = 0
        self.num_retractions = 0
        self.num_steps = 0
        self.idle = True  # the last step ran no batch (the loop may sleep while transfers are pending)
        mode = settings.overlap_schedule
        self.overlap = mode == "on" or (mode == "auto" and runner.device.type == "cuda")
        self.inflight: InflightBatch | None = None
        self.num_overlapped_steps = 0
        self.num_overlapped_extends = 0

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self._arrivals += 1
        req.arrival = self._arrivals
        req.status = Status.WAITING
        if isinstance(self.pd, DecodeSide):
            self.pd.add(req)
            return
        self.waiting.append(req)

    def abort(self, rid: str) -> Request | None:
        """Finish ``rid`` with reason ``abort`` and free its pages. Returns it, or None if unknown."""
        for req in list(self.waiting) + self.running:
            if req.rid == rid:
                self._finish(req, FinishReason("abort", message="aborted by the client"))
                return req
        if self.pd is not None:
            for req in self.pd.inflight:
                if req.rid == rid and self.pd.abort(self, req):
                    return req
        return None

    def has_work(self) -> bool:
        """Anything to step for: queued or running requests, PD transfers in flight, or quarantined
        decode pages waiting for their release (steps poll for it)."""
        return bool(self.waiting or self.running or (self.pd is not None and self.pd.busy))

    def hot(self) -> bool:
        """PD writes in flight that the loop should poll for without sleeping."""
        return self.pd is not None and self.pd.hot

    def can_admit(self) -> bool:
        return len(self.running) < self.settings.max_running_requests and self.runner.req_to_token.num_free > 0

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while any request pins one."""
        return self.cache.flush() if self.cache is not None else True

    def check_integrity(self) -> None:
        inflight = self.pd.inflight if self.pd is not None else []
        self.kv.check_integrity(self.running + list(self.waiting) + inflight)
        for r in self.waiting:
            if r.pages:
                raise AssertionError(f"waiting request {r.rid} holds pages")

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one step; return requests with new output (finished ones included)."""
        updated = self.pd.poll(self) if self.pd is not None else []
        if updated:
            # Hand these out before the next forward: on a decode worker the first token arrived
            # with the KV, and holding it back for a decode step would add that step to TTFT.
            self.idle = False
            return updated
        done = self._resolve() if self.inflight is not None and not self._may_run_ahead() else []
        batch = self.schedule()
        if batch is None:
            if self.inflight is not None:
                done += self._resolve()
            self.idle = not done
            return done
        self.idle = False
        self.num_steps += 1
        decode = batch.mode is ForwardMode.DECODE
        if self.overlap and (decode or self.pd is None) and overlappable(batch):
            # Launch this batch before reading the previous one's tokens (placeholders stand in;
            # an extend batch has none: its tokens are prompts and outputs read before admission).
            prev = self.inflight
            inp = self._model_input(batch, prev.next_ids if prev is not None and decode else None)
            logits = self.runner.forward(inp).logits
            nxt = self._launch(batch, logits)
            self.num_overlapped_steps += 1
            self.num_overlapped_extends += not decode
            done += self._resolve() if prev is not None else []
            self.inflight = nxt
            return done
        if self.inflight is not None:
            if batch.mode is ForwardMode.DECODE:
                # Its inputs include in-flight tokens: read them first (finished requests drop out).
                done += self._resolve()
                batch.entries = [e for e in batch.entries if not e.req.finished]
                if not batch.entries:
                    return done
                out = self.runner.forward(self._model_input(batch))
            else:  # prompt chunks only (``_may_run_ahead``): independent of the tokens in flight
                out = self.runner.forward(self._model_input(batch))
                done += self._resolve()
        else:
            out = self.runner.forward(self._model_input(batch))
        mask = self.grammar.fill(batch)  # CPU work before anything waits on the logits
        return done + self._update(batch, out.logits, mask)

    # ---- overlap scheduling (engine/scheduler/overlap.py) -----------------------------------
    def _may_run_ahead(self) -> bool:
        """Whether the next step may be scheduled with a batch in flight: it must not retract, so
        every running request must be able to grow to all of its known tokens (the rest of a
        chunked prompt, or the next decode token) from the free pages."""
        need = sum(self.kv.pages_needed(r, r.num_known) for r in self.running if r.status is Status.RUNNING)
        return need <= self.kv.available_pages

    def _launch(self, batch: ScheduledBatch, logits: torch.Tensor) -> InflightBatch | None:
        """Sample ``batch``'s rows on the device without reading them (None: no row samples)."""
        for e in batch.entries:
            e.req.num_computed = e.end
            if batch.mode is ForwardMode.EXTEND:
                self.kv.cache_computed(e.req)  # in-flight prefix: later arrivals reuse it
        reqs = [e.req for e in batch.entries if e.samples]
        if not reqs:
            return None
        sb = self._sampling_batch(reqs, logits.device)
        res = self.sampler(logits, sb, None, need_logprobs=any(r.return_logprob for r in reqs))
        return InflightBatch.launch(reqs, res.next_token_ids, res.logprobs)

    def _sampling_batch(self, reqs: list[Request], device: torch.device) -> SamplingBatch:
        return SamplingBatch.build(
            [r.params for r in reqs], [r.prompt_ids for r in reqs], [r.output_ids for r in reqs],
            self.eos_token_ids, self.vocab_size, device, [r.generator for r in reqs],
        )

    def drain(self) -> list[Request]:
        """Read the batch in flight, if any (overlap scheduling): afterwards every token launched
        so far is on the host. Returns the updated requests."""
        return self._resolve() if self.inflight is not None else []

    def _resolve(self) -> list[Request]:
        """Read the in-flight batch's tokens and append them (a finished request's are dropped)."""
        inf = self.inflight
        assert inf is not None
        self.inflight = None
        ids, lps = inf.wait()
        updated: list[Request] = []
        for i, req in enumerate(inf.reqs):
            if req.finished:
                continue
            assert req.pending_futures and req.pending_futures[0] == i, (req.rid, req.pending_futures, i)
            req.pending_futures.pop(0)
            reason = self.grammar.append(req, ids[i], lps[i], None)
            if reason is not None:
                self._finish(req, reason)
            updated.append(req)
        return updated

    def schedule(self) -> ScheduledBatch | None:
        entries = self._schedule_extend()
        if entries:
            return ScheduledBatch(ForwardMode.EXTEND, entries)
        entries = self._schedule_decode()
        return ScheduledBatch(ForwardMode.DECODE, entries) if entries else None

    # ---- schedule phase --------------------------------------------------------------------
    def _in_prefill(self, req: Request) -> bool:
        return req.num_computed == 0 or req.num_pending > 1

    def _schedule_extend(self) -> list[Entry]:
        budget = min(self.settings.chunked_prefill_size, self.settings.max_prefill_tokens)
        entries: list[Entry] = []
        for req in list(self.running):
            if budget <= 0 or req.status is not Status.RUNNING or not self._in_prefill(req):
                continue
            n = min(req.num_pending, budget)
            if not self._grow_or_retract(req, req.num_computed + n, protect=[e.req for e in entries]):
                continue
            entries.append(self._entry(req, n))
            budget -= n
        if not self.waiting or budget <= 0 or len(self.running) >= self.settings.max_running_requests:
            return entries
        for req in self.policy.order(self.waiting, self.kv):
            if budget <= 0 or len(self.running) >= self.settings.max_running_requests:
                break
            if self.runner.req_to_token.num_free == 0:
                break
            if self.kv.cache is not None and self._shares_with_batch(req, entries):
                continue  # compute the shared prefix once: this one reuses it next step
            cached = self.kv.attach_prefix(req)
            n = min(req.num_pending, budget)
            if self.kv.pages_needed(req, req.num_computed + n) > self.kv.available_pages - self.reserved_pages():
                self.kv.release(req, keep_in_cache=False)
                break
            self.kv.grow(req, req.num_computed + n)
            if not req.admitted_once:
                req.cached_tokens = cached
                req.admitted_once = True
            self.waiting.remove(req)
            req.status = Status.RUNNING
            self.running.append(req)
            entries.append(self._entry(req, n))
            budget -= n
        return entries

    def _shares_with_batch(self, req: Request, entries: list[Entry]) -> bool:
        """True when ``req`` shares a long uncached prefix with a request computing this step."""
        threshold = max(self.kv.page_size, IN_BATCH_SHARE_THRESHOLD)
        mine = req.tokens(0, req.num_known - 1)
        cached = self.kv.match_len(req)
        for e in entries:
            if e.req.extra_key != req.extra_key:
                continue
            other = e.req.tokens(0, e.req.num_known)
            n = min(len(mine), len(other))
            same = next((i for i in range(n) if mine[i] != other[i]), n)
            if same - cached >= threshold:
                return True
        return False

    def reserved_pages(self) -> int:
        """Pages kept back for running requests' future decode tokens (``new_token_ratio``)."""
        ratio = self.settings.new_token_ratio
        if ratio == 0:
            return 0
        tokens = 0
        for r in self.running:
            left = max(r.params.max_new_tokens - len(r.output_ids), 0)
            tokens += int(left * ratio)
        return -(-tokens // self.kv.page_size)

    def _schedule_decode(self) -> list[Entry]:
        # With a batch in flight, a request whose in-flight token is its last allowed one waits to
        # be finished by that token instead of computing one more.
        reqs = [r for r in self.running if not (r.pending_futures and self._at_length_limit(r))]
        for req in sorted(reqs, key=lambda r: r.arrival):
            if req.status is Status.RUNNING:
                self._grow_or_retract(req, req.num_known, protect=[])
        return [self._entry(r, 1) for r in reqs if r.status is Status.RUNNING]

    def _at_length_limit(self, req: Request) -> bool:
        n = len(req.output_ids) + len(req.pending_futures)
        return n >= req.params.max_new_tokens or req.num_known >= self.runner.context_length

    def _grow_or_retract(self, req: Request, upto: int, protect: list[Request]) -> bool:
        """Make room for ``req`` up to ``upto`` tokens, retracting newer requests if needed."""
        while True:
            try:
                self.kv.grow(req, upto)
                return True
            except OutOfPagesError:
                movable = [r for r in self.running if r is not req and r not in protect and not self._pinned(r)]
                victims = [r for r in movable if r.arrival > req.arrival] or movable
                if not victims:
                    if self._in_prefill(req) and req.num_computed > 0:
                        return False  # wait for others to finish
                    self._finish(req, FinishReason("length", message="KV cache is full"))
                    return False
                self._retract(max(victims, key=lambda r: r.arrival))

    def _pinned(self, req: Request) -> bool:
        return self.prefill_pd is not None and self.prefill_pd.pinned(req)

    def _retract(self, req: Request) -> None:
        logger.debug("retracting %s (%d tokens known)", req.rid, req.num_known)
        self.running.remove(req)
        self.kv.release(req)
        req.status = Status.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        # Keep waiting in arrival order so the oldest retracted request goes first.
        items = sorted([*self.waiting, req], key=lambda r: r.arrival)
        self.waiting = deque(items)

    def _entry(self, req: Request, n: int) -> Entry:
        e = Entry(req, req.num_computed, n)
        if req.wants_prompt_logprobs:
            # Logits at position p give the logprob of prompt token p + 1.
            first = req.prompt_logprobs_done - 1
            last = len(req.prompt_ids) - 2
            lo, hi = max(first, e.start), min(last, e.end - 1)
            e.logprob_positions = list(range(lo, hi + 1))
        return e

    # ---- run phase input -------------------------------------------------------------------
    def _model_input(self, batch: ScheduledBatch, future_ids: torch.Tensor | None = None) -> ModelInput:
        ids: list[int] = []
        pos: list[int] = []
        locs: list[torch.Tensor] = []
        logit_idx: list[int] = []
        off = 0
        decode = batch.mode is ForwardMode.DECODE
        for e in batch.entries:
            ids.extend(e.req.tokens(e.start, e.end))
            pos.extend(range(e.start, e.end))
            if not decode:
                locs.append(self.kv.slots(e.req, e.start, e.end))
            logit_idx.extend(off + p - e.start for p in e.logprob_positions)
            if e.samples:
                logit_idx.append(off + e.num_tokens - 1)
            off += e.num_tokens
        # Decode: one slot per request, computed on the host (a CPU tensor the runner copies with
        # its other inputs); extend: slices of the device table.
        loc = (torch.tensor([self.kv.slot(e.req, e.start) for e in batch.entries], dtype=torch.int64)
               if decode else torch.cat(locs))
        return ModelInput(
            mode=batch.mode,
            input_ids=ids,
            positions=pos,
            out_cache_loc=loc,
            req_rows=[e.req.row for e in batch.entries],  # type: ignore[misc]
            prefix_lens=[e.start for e in batch.entries],
            extend_lens=[e.num_tokens for e in batch.entries],
            logit_indices=logit_idx,
            future_ids=future_ids,
        )

    # ---- sample + update phases ------------------------------------------------------------
    def _update(self, batch: ScheduledBatch, logits: torch.Tensor, mask: GrammarMask | None = None) -> list[Request]:
        row = 0
        sample_rows: list[int] = []
        sample_entries: list[Entry] = []
        failed: list[Request] = []
        for e in batch.entries:
            if e.logprob_positions:
                n = len(e.logprob_positions)
                self.outputs.record_prompt_logprobs(e, logits[row : row + n])
                row += n
            e.req.num_computed = e.end
            if self.prefill_pd is not None and self.prefill_pd.owns(e.req):
                # Write this chunk's pages to the decode side; a failed request is finished.
                if not e.samples and not self.prefill_pd.after_chunk(self, e.req):
                    failed.append(e.req)
                    continue
            elif batch.mode is ForwardMode.EXTEND:
                self.kv.cache_computed(e.req)  # in-flight prefix: later arrivals reuse it
            if e.samples:
                sample_rows.append(row)
                sample_entries.append(e)
                row += 1
        updated = failed + [e.req for e in batch.entries if e.logprob_positions and not e.samples and not e.req.finished]
        if sample_entries:
            reqs = [e.req for e in sample_entries]
            sb = self._sampling_batch(reqs, logits.device)
            tops = [r.top_logprobs_num if r.return_logprob else 0 for r in reqs]
            rows = logits[sample_rows]
            if mask is not None:
                rows = rows.float()  # the grammar backends mask float32 logits
            self.grammar.apply(rows, mask)
            res = self.sampler(rows, sb, tops if any(tops) else None, need_logprobs=any(r.return_logprob for r in reqs))
            next_ids = res.next_token_ids.tolist()
            lps = res.logprobs.tolist()
            for i, req in enumerate(reqs):
                top = res.top_logprobs[i] if res.top_logprobs is not None else None
                reason = self.grammar.append(req, next_ids[i], lps[i], top)
                if self.prefill_pd is not None and self.prefill_pd.owns(req):
                    self.prefill_pd.on_prefilled(self, req, reason)
                elif reason is not None:
                    self._finish(req, reason)
                updated.append(req)
        return updated

    def admit_prefilled(
        self, req: Request, first_token: int, logprob: float | None, top: list[tuple[float, int]] | None = None
    ) -> None:
        """Decode side: the prompt's KV arrived; append the prefill's first token (its logprob and
        top logprobs as the prefill sampled them) and run. The prompt logprobs, if any, are already
        on ``req``: a later retraction recomputes the prompt without recording them again."""
        req.status = Status.RUNNING
        req.prompt_logprobs_done = max(req.prompt_logprobs_done, len(req.prompt_ids))
        self.running.append(req)
        reason = self.grammar.append(req, first_token, logprob if logprob is not None else 0.0, top)
        if reason is not None:
            self._finish(req, reason)

    def finish_external(self, req: Request, reason: FinishReason) -> None:
        """Finish a request held outside the queues (disaggregation stages)."""
        self._finish(req, reason)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is Status.FINISHED:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.prefill_pd is not None and self.prefill_pd.owns(req):
            self.prefill_pd.on_finish(req)  # not a transfer's end: cancel the room before freeing pages
        if req.pending_futures:  # tokens of batches in flight are dropped (overlap scheduling)
            req.pending_futures.clear()
            req.num_computed = min(req.num_computed, req.num_known)
        self.kv.release(req)
        req.finish_reason = reason
        req.status = Status.FINISHED
        self.outputs.finalize(req)

    def abort_all(self, message: str) -> Iterable[Request]:
        reqs = list(self.waiting) + list(self.running)
        for r in reqs:
            self._finish(r, FinishReason("abort", message=message))
        if self.pd is not None:
            reqs += self.pd.abort_all(self, message)
        return reqs
