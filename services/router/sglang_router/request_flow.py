"""One request through the router: validate, fan out, route, stream from workers, detokenize.

    prepared = flow.prepare(model, prompts=[ids], sampling={...}, ...)   # 400s happen here
    async with contextlib.aclosing(flow.stream(prepared)) as updates:  # RouterError before the
        async for u in updates:                                           # first update: a 4xx/5xx
            ...  # SampleUpdate: new visible text of sample u.index; u.finish_reason on its last one

Every (prompt, sample) pair is one worker call (two in PD mode: a prefill and a decode worker, see
``pd_flow``) (``n`` fans out: sample ``j`` of a seeded request
gets ``seed + j``, as ``sglang.Engine`` does). Each call picks a worker through the policy, streams
token ids back, detokenizes them incrementally and applies stop strings here (they are also sent to
the worker so it stops early; the router's own check trims the text and cancels the worker stream).
A worker that is unavailable before it produced a token is marked failed and the call is retried on
another worker (``max_retries``); a failure after that ends the request with a 503 error. Leaving the
stream early (client disconnect, error in another sample) cancels every worker call, which aborts
the request on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sglang.engine.sampling.params import SamplingParams
from sglang.observability.metrics import RouterMetrics
from sglang.settings.router import RouterSettings
from sglang.transport.types import GenerateEvent, GenerateInput, WorkerUnavailable

from sglang_router.discovery import Discovery, WorkerHandle
from sglang_router.errors import RouterError, bad_request, param_of_value_error
from sglang_router.models import ModelState
from sglang_router.pd_flow import PDFlow
from sglang_router.policies import RoutingPolicy, WorkerView
from sglang_router.sample_output import SampleDecoder, SampleResult, SampleUpdate, collect

__all__ = ["PreparedRequest", "RequestFlow", "Sample", "SampleResult", "SampleUpdate", "collect"]

logger = logging.getLogger(__name__)

# Sampling parameters the worker's wire format carries (common.proto SamplingParams).
WIRE_SAMPLING_FIELDS = (
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "min_new_tokens", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
    "n", "seed", "regex", "json_schema", "ebnf", "logit_bias", "no_stop_trim",
)


@dataclass
class Sample:
    """One worker call: prompt ``prompt_index``, sample ``index`` of the response."""

    index: int
    prompt_index: int
    input_ids: list[int]
    params: SamplingParams


@dataclass
class PreparedRequest:
    request_id: str
    model: ModelState
    samples: list[Sample]
    num_prompts: int
    n: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


class RequestFlow:
    def __init__(
        self,
        settings: RouterSettings,
        discovery: Discovery,
        policy: RoutingPolicy,
        metrics: RouterMetrics,
    ) -> None:
        self.settings = settings
        self.discovery = discovery
        self.policy = policy
        self.metrics = metrics
        self.inflight = 0  # requests being streamed (draining waits for 0)
        self.draining = False
        self.pd = PDFlow(self)

    # ------------------------------------------------------------------ preparation (400s)

    def prepare(
        self,
        model: ModelState,
        prompts: Sequence[list[int]],
        sampling: dict[str, Any] | Sequence[dict[str, Any]] | None,
        *,
        prompt_param: str = "prompt",
        param_names: dict[str, str] | None = None,
        default_max_new_tokens: int | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int | None = None,
        request_id: str | None = None,
    ) -> PreparedRequest:
        """Validate prompts and sampling params (one dict for all prompts, or one per prompt; SGLang
        names). ``default_max_new_tokens`` None means up to the context length. Raises a 400
        :class:`RouterError` naming the field (``param_names`` maps SGLang names to the API's)."""
        names = param_names or {}
        if self.draining:
            raise RouterError(503, "the router is shutting down", retry_after=self.settings.retry_after_s)
        if not prompts:
            raise bad_request(f"{prompt_param} is empty", prompt_param)
        dicts = list(sampling) if isinstance(sampling, Sequence) else [sampling or {}] * len(prompts)
        if len(dicts) != len(prompts):
            raise bad_request(f"sampling_params has {len(dicts)} entries for {len(prompts)} prompts", "sampling_params")
        samples: list[Sample] = []
        n = 1
        for p, (ids, d) in enumerate(zip(prompts, dicts, strict=True)):
            self._check_prompt(model, ids, prompt_param)
            params = self._params(model, ids, d, names, default_max_new_tokens)
            n = params.n if p == 0 else n
            if params.n != n:
                raise bad_request("n must be the same for every prompt", names.get("n", "n"))
            for j in range(params.n):
                one = SamplingParams.from_dict(params.to_dict())
                one.n = 1
                if params.seed is not None:
                    one.seed = params.seed + j
                samples.append(Sample(len(samples), p, list(ids), one))
        if top_logprobs_num < 0:
            raise bad_request("top_logprobs_num must be >= 0", names.get("top_logprobs_num", "top_logprobs_num"))
        return PreparedRequest(
            request_id=request_id or uuid.uuid4().hex,
            model=model,
            samples=samples,
            num_prompts=len(prompts),
            n=n,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num if return_logprob else 0,
            logprob_start_len=logprob_start_len if return_logprob else None,
        )

    @staticmethod
    def _check_prompt(model: ModelState, ids: Sequence[int], param: str) -> None:
        if not ids:
            raise bad_request(f"{param} is empty; it needs at least one token", param)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < model.vocab_size:
                raise bad_request(f"{param} contains {t!r}, not a token id in [0, {model.vocab_size})", param)
        if model.context_length and len(ids) >= model.context_length:
            raise bad_request(
                f"{param} is {len(ids)} tokens long but the model's context length is {model.context_length}; "
                f"shorten it to at most {model.context_length - 1} tokens",
                param,
                code="context_length_exceeded",
            )

    @staticmethod
    def _params(
        model: ModelState, ids: Sequence[int], d: dict[str, Any], names: dict[str, str], default_max: int | None
    ) -> SamplingParams:
        d = {k: v for k, v in d.items() if v is not None} if isinstance(d, dict) else d  # null: the default
        try:
            params = SamplingParams.from_dict(d)
            params.normalize()
            params.verify(model.vocab_size)
        except (ValueError, TypeError) as e:
            msg = str(e)
            param = param_of_value_error(msg)
            api_param = names.get(param, param) if param else None
            if param and api_param != param:
                msg = msg.replace(param, api_param or param, 1)
            raise bad_request(msg, api_param) from None
        room = (model.context_length - len(ids)) if model.context_length else None
        if "max_new_tokens" not in d and default_max is None and room is not None:
            params.max_new_tokens = room
        elif "max_new_tokens" not in d and default_max is not None:
            params.max_new_tokens = default_max
        if room is not None:
            params.max_new_tokens = min(params.max_new_tokens, room)
            params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)
        return params

    # ------------------------------------------------------------------ streaming

    async def stream(self, req: PreparedRequest) -> AsyncGenerator[SampleUpdate, None]:
        """Updates of every sample, interleaved. Raises :class:`RouterError` on the first failure."""
        queue: asyncio.Queue[SampleUpdate | RouterError] = asyncio.Queue()
        tasks = [asyncio.create_task(self._run_sample(req, s, queue)) for s in req.samples]
        remaining = len(tasks)
        deadline = req.arrival + self.settings.request_timeout_s
        self.inflight += 1
        try:
            while remaining:
                timeout = deadline - time.monotonic()
                try:
                    if timeout <= 0:
                        raise asyncio.TimeoutError
                    # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives
                    # once queue.get() is done but before wait_for resumes (CPython gh-86296). The
                    # handler of a non-streaming request that lost its client (aiohttp
                    # handler_cancellation) then went on collecting, and the worker ran to the end.
                    async with asyncio.timeout(timeout):
                        item = await queue.get()
                except asyncio.TimeoutError:
                    raise RouterError(
                        504, f"the request took longer than {self.settings.request_timeout_s:g} s", code="timeout"
                    ) from None
                if isinstance(item, RouterError):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
            self.metrics.e2e_request_latency_seconds.observe(time.monotonic() - req.arrival)
        finally:
            self.inflight -= 1
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_sample(self, req: PreparedRequest, s: Sample, out: asyncio.Queue[SampleUpdate | RouterError]) -> None:
        try:
            await self._sample(req, s, out)
        except RouterError as e:
            out.put_nowait(e)
        except Exception as e:  # a bug must end the request, not hang it
            logger.exception("request %s sample %d failed", req.request_id, s.index)
            out.put_nowait(RouterError(500, f"internal error in the router: {type(e).__name__}: {e}"))

    def _wire_params(self, params: SamplingParams) -> dict[str, Any]:
        d = params.to_dict()
        return {k: d[k] for k in WIRE_SAMPLING_FIELDS if d.get(k) is not None}

    async def _sample(self, req: PreparedRequest, s: Sample, out: asyncio.Queue[SampleUpdate | RouterError]) -> None:
        decoder = SampleDecoder(req.model.tokenizer, s.index, s.input_ids, s.params)
        inp = GenerateInput(
            request_id=f"{req.request_id}-{s.index}",
            input_ids=s.input_ids,
            sampling_params=self._wire_params(s.params),
            return_logprob=req.return_logprob,
            logprob_start_len=req.logprob_start_len,
            top_logprobs_num=req.top_logprobs_num,
            stream=True,
        )
        if self.pd.enabled(req.model.name):
            await self.pd.run(req, s, inp, decoder, out)
            return
        tried: set[str] = set()
        retries = 0
        while True:
            handle, decision = await self.pick(req, s, tried)
            tried.add(handle.worker_id)
            self.metrics.requests_total.labels(handle.worker_id, self.policy.name, decision).inc()
            last = time.monotonic()
            try:
                with self.discovery.track(handle):
                    async with contextlib.aclosing(handle.client.generate(inp)) as events:
                        async for ev in events:
                            if ev.kind == "error":
                                code = ev.error_code or 500
                                self.metrics.upstream_errors_total.labels(handle.worker_id, str(code)).inc()
                                if code == 503 and decoder.num_tokens == 0 and retries < self.settings.max_retries:
                                    break  # overloaded or draining: try another worker
                                raise RouterError(
                                    code, ev.error_message or "the worker failed the request",
                                    param=ev.error_param or None,
                                    retry_after=self.settings.retry_after_s if code == 503 else None,
                                )
                            last = self.observe_tokens(req, ev, decoder.num_tokens, last)
                            u = decoder.feed(ev, handle.worker_id)
                            if u.finish_reason is not None:
                                self.metrics.prompt_tokens_total.inc(len(s.input_ids))
                            out.put_nowait(u)
                            if u.finish_reason is not None:
                                return  # leaving the iterator cancels the worker call if it still runs
                retries += 1  # the worker answered 503 before any token
            except WorkerUnavailable as e:
                self.discovery.mark_failed(handle.worker_id)
                self.metrics.upstream_errors_total.labels(handle.worker_id, "unavailable").inc()
                if decoder.num_tokens == 0 and retries < self.settings.max_retries:
                    logger.info("request %s: %s; retrying on another worker", inp.request_id, e)
                    retries += 1
                    continue
                raise RouterError(
                    503, f"worker {handle.worker_id} became unavailable: {e}",
                    code="worker_unavailable", retry_after=self.settings.retry_after_s,
                ) from None

    def observe_tokens(self, req: PreparedRequest, ev: GenerateEvent, seen: int, last: float) -> float:
        """TTFT (first token of the request), ITL (per token of later events), tokens streamed."""
        if not ev.token_ids:
            return last
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.time_to_first_token_seconds.observe(now - req.arrival)
        elif seen:
            for _ in ev.token_ids:
                self.metrics.inter_token_latency_seconds.observe((now - last) / len(ev.token_ids))
        self.metrics.generation_tokens_total.inc(len(ev.token_ids))
        return now

    async def pick(
        self, req: PreparedRequest, s: Sample, tried: set[str], role: str = "unified"
    ) -> tuple[WorkerHandle, str]:
        """A worker of ``role`` for sample ``s`` through the policy (not one of ``tried``)."""
        retry_after = self.settings.retry_after_s
        workers = [h for h in self.discovery.routable(req.model.name, role) if h.worker_id not in tried]
        if not workers:
            kind = "" if role == "unified" else f"{role} "
            what = f"no other {kind}worker" if tried else f"no {kind}worker"
            raise RouterError(503, f"{what} is available for model {req.model.name!r}", retry_after=retry_after)
        free = [
            h for h in workers
            if not h.at_capacity(self.settings.max_inflight_per_worker, self.settings.max_waiting_per_worker)
        ]
        if not free:
            raise RouterError(
                503, "every worker is at capacity; retry later", code="overloaded", retry_after=retry_after
            )
        by_id = {h.worker_id: h for h in free}
        views = [WorkerView(h.worker_id, h.load) for h in free]
        try:
            sel = await self.policy.select(views, s.input_ids)
            return by_id[sel.worker.worker_id], sel.decision
        except Exception as e:  # e.g. Redis down under the shared index: route anyway
            logger.warning("policy %s failed (%s); routing to the least loaded worker", self.policy.name, e)
            return by_id[min(views, key=lambda v: (v.load, v.worker_id)).worker_id], "fallback"
