"""``sglang.Engine``: the in-process inference engine (SGLang's offline engine interface).

    engine = Engine(model_path=None, **settings)      # None: the default model (SmolLM2-135M)
    engine.generate(prompt="Hello", sampling_params={"max_new_tokens": 8})
    await engine.async_generate(prompt=[...], stream=True)
    engine.shutdown()

Settings are the fields of ModelSettings, CacheSettings and SchedulerSettings, passed as
keywords. A scheduler thread runs the steps; ``generate`` is safe to call from many threads.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import queue
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import torch
from pydantic_settings import BaseSettings

from sglang.engine.constrained import (
    GRAMMAR_KINDS,
    CompiledGrammar,
    GrammarBackend,
    GrammarCache,
    create_grammar_backend,
)
from sglang.engine.io import build_output, normalize_inputs, validate_ids
from sglang.engine.loop import EngineLoop
from sglang.engine.models.default_model import default_model_path
from sglang.engine.prefix_cache import InProcessPublisher, RadixCache
from sglang.engine.runner.model_runner import ModelRunner
from sglang.engine.sampling.params import SamplingParams
from sglang.engine.scheduler.disagg import DecodeSide, PrefillSide
from sglang.engine.scheduler.request import Request
from sglang.engine.scheduler.scheduler import Scheduler
from sglang.engine.tokenizer.detokenizer import IncrementalDetokenizer
from sglang.engine.tokenizer.stop import StopChecker
from sglang.engine.tokenizer.tokenizer import Tokenizer
from sglang.settings import CacheSettings, ModelSettings, SchedulerSettings
from sglang.settings.disagg import DisaggSettings

logger = logging.getLogger(__name__)

GRAMMAR_BACKEND = "xgrammar"  # see sglang.engine.constrained.registry
_SETTINGS: tuple[type[BaseSettings], ...] = (ModelSettings, CacheSettings, SchedulerSettings, DisaggSettings)


def _split_settings(kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{} for _ in _SETTINGS]
    for key, value in kwargs.items():
        for i, cls in enumerate(_SETTINGS):
            if key in cls.model_fields:
                parts[i][key] = value
                break
        else:
            known = sorted(f for cls in _SETTINGS for f in cls.model_fields)
            raise TypeError(f"Engine got an unknown setting {key!r}; known settings: {', '.join(known)}")
    return parts


_gc_frozen = False


def freeze_startup_objects() -> None:
    """``gc.freeze()`` once per process, after the first engine's start-up (see
    ``SchedulerSettings.gc_freeze``): a serving process has one engine; in a process that builds
    many (tests), what later engines leave behind stays collectable."""
    global _gc_frozen
    if _gc_frozen:
        return
    _gc_frozen = True
    gc.collect()
    gc.freeze()


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        model_kw, cache_kw, sched_kw, disagg_kw = _split_settings(kwargs)
        self.model_settings = ModelSettings(model_path=model_path, **model_kw)
        self.disagg_settings = DisaggSettings(**disagg_kw)
        if self.disagg_settings.disaggregation_mode == "decode":
            cache_kw["disable_radix_cache"] = True  # the prompt's KV arrives from the prefill side
        self.cache_settings = CacheSettings(**cache_kw)
        self.scheduler_settings = SchedulerSettings(**sched_kw)
        self.model_path = self.model_settings.model_path or default_model_path()
        self.tokenizer = self._load_tokenizer()
        self.runner = ModelRunner(self.model_settings, self.cache_settings, self.scheduler_settings, self.model_path)
        info = self.runner.info
        eos = list(self.tokenizer.eos_token_ids) if self.tokenizer else []
        eos += [e for e in info.eos_token_ids if e not in eos]
        self.eos_token_ids = eos
        torch.manual_seed(self.model_settings.seed)
        self.kv_events = InProcessPublisher()
        cache = None
        if not self.cache_settings.disable_radix_cache:
            cache = RadixCache(
                self.runner.allocator, self.runner.page_size, self.cache_settings.eviction_policy, self.kv_events
            )
        self.scheduler = Scheduler(self.runner, self.scheduler_settings, eos, cache, self._make_pd())
        # Structured output: grammars compile on the caller's thread (never the scheduler's), once
        # per (kind, spec); the backend (tokenizer info) is built on the first grammar request.
        self.grammars = GrammarCache(self._make_grammar_backend)
        if self.scheduler_settings.gc_freeze:
            freeze_startup_objects()
        self._loop = EngineLoop(self.scheduler, self.scheduler_settings.check_integrity_when_idle)
        self._counter = itertools.count()
        logger.info("engine ready: %s (%s, %s)", self.model_path, info.architecture, self.runner.dtype)

    def _make_pd(self) -> PrefillSide | DecodeSide | None:
        s = self.disagg_settings
        if s.disaggregation_mode == "null":
            return None
        if s.kv_transfer_redis_url is None:
            raise ValueError(f"disaggregation_mode={s.disaggregation_mode} needs kv_transfer_redis_url")
        from sglang.kv_transfer import KVLayout, create_receiver, create_sender

        info = self.runner.info
        layout = KVLayout(
            model=f"{info.architecture}:{os.path.basename(os.path.normpath(self.model_path))}",
            num_layers=info.num_layers, page_size=self.runner.page_size, num_kv_heads=info.num_kv_heads,
            head_dim=info.head_dim, dtype=str(self.runner.kv_pool.dtype).replace("torch.", ""),
        )
        name = s.kv_transfer_agent_name or f"{s.disaggregation_mode}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        kw = {
            "kv_pool": self.runner.kv_pool, "layout": layout, "agent_name": name,
            "redis_url": s.kv_transfer_redis_url, "timeout_s": s.kv_transfer_timeout_s,
        }
        self.kv_agent_name = name
        if s.disaggregation_mode == "prefill":
            # Test hook, read here (never at import): hold long prompts between KV chunks.
            delay = float(os.environ.get("SGLANG_TEST_PD_CHUNK_DELAY_S", "0") or 0)
            min_prompt = int(os.environ.get("SGLANG_TEST_PD_CHUNK_DELAY_MIN_PROMPT", "0") or 0)
            if delay > 0:
                logger.warning("test hook: prefill sleeps %gs after each KV chunk of prompts >= %d tokens",
                               delay, min_prompt)
            sender = create_sender(s.kv_transfer_backend, **kw)
            return PrefillSide(sender, self.runner.page_size, s.kv_transfer_timeout_s, delay, min_prompt,
                               spin=self.runner.device.type == "cuda")
        pool = self.runner.kv_pool
        page_bytes = pool.bytes_per_token(info.num_layers, info.num_kv_heads, info.head_dim, pool.dtype) * pool.page_size
        return DecodeSide(create_receiver(s.kv_transfer_backend, **kw), page_bytes)

    def _make_grammar_backend(self) -> GrammarBackend:
        if self.tokenizer is None:
            raise ValueError(
                "structured output needs the model's tokenizer and this engine has none "
                "(started with skip_tokenizer_init, or the model folder has no tokenizer files)"
            )
        return create_grammar_backend(
            GRAMMAR_BACKEND, tokenizer=self.tokenizer.hf, vocab_size=self.runner.info.vocab_size,
            stop_token_ids=list(self.eos_token_ids), num_threads=min(8, os.cpu_count() or 1),
        )

    def _compile_grammar(self, params: SamplingParams) -> CompiledGrammar | None:
        """The compiled grammar of verified ``params`` (cached), or None. ValueError names the field."""
        for kind in GRAMMAR_KINDS:
            spec = getattr(params, kind)
            if spec is not None:
                return self.grammars.get(kind, spec)
        return None

    def _precompile(self, sampling_params: dict[str, Any] | list[dict[str, Any]] | None) -> None:
        """Compile the grammars of raw ``sampling_params`` into the cache (``async_generate`` runs
        this in a thread so the event loop never waits on a compile). Malformed values are left to
        ``SamplingParams.verify``."""
        dicts = sampling_params if isinstance(sampling_params, list) else [sampling_params]
        for d in dicts:
            if isinstance(d, dict):
                for kind in GRAMMAR_KINDS:
                    if isinstance(d.get(kind), str):
                        self.grammars.get(kind, d[kind])

    @staticmethod
    def _wants_grammar(sampling_params: dict[str, Any] | list[dict[str, Any]] | None) -> bool:
        dicts = sampling_params if isinstance(sampling_params, list) else [sampling_params]
        return any(isinstance(d, dict) and any(d.get(k) is not None for k in GRAMMAR_KINDS) for d in dicts)

    def _load_tokenizer(self) -> Tokenizer | None:
        if self.model_settings.skip_tokenizer_init:
            return None
        path = self.model_settings.tokenizer_path or self.model_path
        try:
            return Tokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            if self.model_settings.load_format == "dummy":
                logger.warning("no tokenizer at %s (%s); pass input_ids", path, e)
                return None
            raise

    # ---- building requests ---------------------------------------------------------------
    def _make_requests(
        self,
        prompt: str | list[str] | None,
        input_ids: list[int] | list[list[int]] | None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None,
        return_logprob: bool,
        logprob_start_len: int | None,
        top_logprobs_num: int,
        stream: bool,
        rid: str | None = None,
        bootstrap_room: int | None = None,
    ) -> tuple[list[Request], bool]:
        """Validate everything first (nothing is submitted if any prompt is bad)."""
        texts, ids_list, params_list, is_batch = normalize_inputs(prompt, input_ids, sampling_params)
        if top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {top_logprobs_num}")
        vocab = self.runner.info.vocab_size
        ctx = self.runner.context_length
        reqs: list[Request] = []
        for text, ids, pdict in zip(texts, ids_list, params_list, strict=True):
            if ids is None:
                if self.tokenizer is None:
                    raise ValueError("this engine has no tokenizer; pass input_ids instead of prompt")
                ids = self.tokenizer.encode(text or "")
            validate_ids(ids, vocab, ctx, self.runner.max_total_tokens)
            params = SamplingParams.from_dict(pdict).normalize()
            params.verify(vocab)
            grammar = self._compile_grammar(params)
            params.max_new_tokens = min(params.max_new_tokens, ctx - len(ids))
            for i in range(params.n):
                req = self._request(ids, params, i, return_logprob, logprob_start_len, top_logprobs_num, stream)
                req.grammar = grammar.new_matcher() if grammar is not None else None  # one per sample
                reqs.append(req)
        if rid is not None:
            for i, req in enumerate(reqs):
                req.rid = rid if len(reqs) == 1 else f"{rid}-{i}"
        mode = self.disagg_settings.disaggregation_mode
        if mode != "null" and bootstrap_room is not None and len(reqs) != 1:
            raise ValueError("bootstrap_room pairs exactly one request (n=1, one prompt)")
        if mode == "decode" and bootstrap_room is None:
            raise ValueError("bootstrap_room is required on a decode worker")
        if bootstrap_room is not None:
            if mode == "null":
                raise ValueError("bootstrap_room needs disaggregation_mode prefill or decode")
            reqs[0].bootstrap_room = bootstrap_room
        return reqs, is_batch or len(reqs) > 1

    def _request(
        self, ids: list[int], params: SamplingParams, i: int, return_logprob: bool,
        logprob_start_len: int | None, top_logprobs_num: int, stream: bool,
    ) -> Request:
        req = Request(
            rid=uuid.uuid4().hex,
            prompt_ids=list(ids),
            params=params,
            return_logprob=return_logprob,
            logprob_start_len=(-1 if logprob_start_len is None else logprob_start_len) if return_logprob else -1,
            top_logprobs_num=top_logprobs_num if return_logprob else 0,
            stream=stream,
        )
        if params.seed is not None:
            req.generator = torch.Generator(self.runner.device).manual_seed(params.seed + i)
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(
                self.tokenizer, prompt_ids=req.prompt_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
            )
            if params.stop:
                req.stop_checker = StopChecker(params.stop, no_stop_trim=params.no_stop_trim)
        req.init_logprobs()
        return req

    # ---- public API ----------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        image_data: Any = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int = 0,
        stream: bool = False,
        rid: str | None = None,
        bootstrap_room: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (a dict) or a batch / ``n > 1`` (a list of dicts, in order).
        With ``stream=True``, an iterator of cumulative snapshots (batch items carry ``index``).
        ``rid`` names the request for :meth:`abort` (``rid-i`` for the i-th of several).
        Raises ValueError on bad input before anything is queued."""
        self._reject_images(image_data)
        reqs, is_batch = self._make_requests(
            prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, stream, rid,
            bootstrap_room,
        )
        if stream:
            return self._stream(reqs, is_batch)
        outs: list[queue.Queue[dict[str, Any]]] = []
        for req in reqs:
            q: queue.Queue[dict[str, Any]] = queue.Queue()
            outs.append(q)

            def on_final(r: Request, q: queue.Queue[dict[str, Any]] = q) -> None:
                if r.finished:
                    q.put(build_output(r))

            self._loop.submit(req, on_final)
        results = [q.get() for q in outs]
        return results if is_batch else results[0]

    def _stream(self, reqs: list[Request], is_batch: bool) -> Iterator[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        for i, req in enumerate(reqs):

            def on_update(r: Request, idx: int | None = i if is_batch else None) -> None:
                q.put(build_output(r, idx))

            self._loop.submit(req, on_update)
        left = len(reqs)
        try:
            while left:
                out = q.get()
                if out["meta_info"]["finish_reason"] is not None:
                    left -= 1
                yield out
        finally:
            if left:
                for req in reqs:
                    self._loop.abort(req.rid)

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        image_data: Any = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int = 0,
        stream: bool = False,
        rid: str | None = None,
        bootstrap_room: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """asyncio twin of :meth:`generate`; with ``stream=True`` it returns an async iterator."""
        self._reject_images(image_data)
        if self._wants_grammar(sampling_params):
            await asyncio.to_thread(self._precompile, sampling_params)
        reqs, is_batch = self._make_requests(
            prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, stream, rid,
            bootstrap_room,
        )
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for i, req in enumerate(reqs):
            def sink(r: Request, i: int = i) -> None:
                if stream or r.finished:
                    loop.call_soon_threadsafe(q.put_nowait, build_output(r, i))
            self._loop.submit(req, sink)
        if stream:
            return self._astream(q, reqs, is_batch)
        results: list[dict[str, Any] | None] = [None] * len(reqs)
        for _ in reqs:
            out = await q.get()
            results[out.pop("index")] = out
        final = [r for r in results if r is not None]
        return final if is_batch else final[0]

    async def _astream(
        self, q: asyncio.Queue[dict[str, Any]], reqs: list[Request], is_batch: bool
    ) -> AsyncIterator[dict[str, Any]]:
        left = len(reqs)
        try:
            while left:
                out = await q.get()
                if out["meta_info"]["finish_reason"] is not None:
                    left -= 1
                if not is_batch:
                    out.pop("index", None)
                yield out
        finally:
            if left:
                for req in reqs:
                    self._loop.abort(req.rid)

    @staticmethod
    def _reject_images(image_data: Any) -> None:
        if image_data is not None:
            raise ValueError("image_data needs a vision model and the encoder service; this model is text-only")

    def abort(self, rid: str) -> None:
        self._loop.abort(rid)

    def check_integrity(self) -> None:
        """Assert free + in use = total pages and that no waiting request holds pages."""
        self._loop.call(lambda s: s.check_integrity())

    def get_stats(self) -> dict[str, Any]:
        def read(s: Scheduler) -> dict[str, Any]:
            alloc = s.runner.allocator
            return {
                "num_running_reqs": len(s.running),
                "num_waiting_reqs": len(s.waiting),
                "num_used_pages": s.kv.pages_in_use,  # owned by requests; cached pages are separate
                "num_total_pages": alloc.num_pages,
                "token_usage": s.kv.pages_in_use / alloc.num_pages,
                "num_retractions": s.num_retractions,
                "cache_hit_rate": s.cache.hit_rate if s.cache is not None else 0.0,
                "num_cached_pages": s.cache.num_cached_pages if s.cache is not None else 0,
                "num_evicted_pages": s.cache.num_evictions if s.cache is not None else 0,
                "num_steps": s.num_steps,
                "max_total_tokens": s.runner.max_total_tokens,
                **self._pd_stats(s),
            }

        stats: dict[str, Any] = self._loop.call(read)
        return stats

    def _pd_stats(self, s: Scheduler) -> dict[str, Any]:
        """PD queue sizes (SGLang's gauge names without the prefix) and cumulative transfer counters."""
        pre = s.pd if isinstance(s.pd, PrefillSide) else None
        dec = s.pd if isinstance(s.pd, DecodeSide) else None
        out: dict[str, Any] = {
            "disaggregation_mode": self.disagg_settings.disaggregation_mode,
            "num_prefill_inflight_queue_reqs": len(pre.inflight) if pre is not None else 0,
            "num_decode_prealloc_queue_reqs": len(dec.prealloc) if dec is not None else 0,
            "num_decode_transfer_queue_reqs": len(dec.transfer) if dec is not None else 0,
        }
        counters = s.pd.stats() if s.pd is not None else {
            "kv_transfer_bytes_total": 0, "kv_transfer_seconds_total": 0.0, "kv_transfer_wire_seconds_total": 0.0,
            "kv_transfer_reqs_total": 0, "kv_transfer_failed_reqs_total": 0,
        }
        return {**out, **counters}

    def flush_cache(self) -> bool:
        """Empty the prefix cache. Refused (False) while requests are running."""
        ok: bool = self._loop.call(lambda s: s.flush_cache())
        return ok

    def shutdown(self) -> None:
        """Abort what is in flight, stop the scheduler thread, close the KV connector (PD) and free
        the model and KV pool."""
        self._loop.stop()
        pd = self.scheduler.pd
        if pd is not None and not getattr(self, "_pd_closed", False):
            self._pd_closed = True
            try:
                pd.close()
            except Exception:  # noqa: BLE001 - shutdown goes on; the agent's records expire by TTL
                logger.exception("closing the KV connector failed")
        del self.runner.kv_pool
        del self.runner.model
        self.runner.graphs = None  # its captured graphs hold a private memory pool
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
