"""The xgrammar backend (xgrammar 0.2.8): regex, JSON schema and EBNF grammars.

Choices: JSON is generated compact (``any_whitespace=False``: ``", "`` and ``": "`` separators, no
free whitespace between tokens), which keeps small or unsure models from spending their budget on
whitespace; ``strict_mode`` (no properties beyond the schema's) is xgrammar's default. EBNF is
xgrammar's GBNF dialect with the start rule ``root``. The mask is applied with xgrammar's kernels:
its C++ loop on CPU, its Triton kernel on CUDA (the torch fallback when Triton is missing).

A workaround: xgrammar 0.2.8 lets a JSON string with ``minLength``/``maxLength`` contain raw
control characters (a tab, U+0001), which JSON forbids. JSON grammars here are compact, so no
valid output ever holds a byte below 0x20: their mask rows also drop every token that has one.

Another: xgrammar 0.2.8's character classes (a regex ``.``, ``[^"]``, ``\\S``, JSON strings, EBNF
``[^...]``) include the UTF-16 surrogates U+D800..U+DFFF, whose UTF-8 form (``ED A0..BF xx``) is
invalid: the text decodes to U+FFFD and no longer matches. Every grammar is therefore converted to
xgrammar's EBNF first and its character classes rewritten to exclude surrogates
(``surrogates.exclude_surrogates``) before it is compiled.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any, Literal

import torch
import xgrammar as xgr

from sglang.engine.constrained.base import CompiledGrammar, GrammarBackend, GrammarMatcher, invalid_grammar
from sglang.engine.constrained.surrogates import exclude_surrogates

logger = logging.getLogger(__name__)

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed check.
_LOG_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")
_CHECK_PREFIX = re.compile(r"^Check failed: \(.*?\) is false:\s*")
_MAX_DETAIL = 400
_Kernel = Literal["cpu", "triton", "torch_native"]


def compiler_message(e: BaseException) -> str:
    """The compiler's own words without its log prefix (bounded: a bad schema is echoed back)."""
    msg = _CHECK_PREFIX.sub("", _LOG_PREFIX.sub("", str(e))).strip()
    return msg if len(msg) <= _MAX_DETAIL else msg[:_MAX_DETAIL] + " ..."


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (control, reserved): never text of a grammar."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """xgrammar's vocabulary for ``tokenizer``, ``vocab_size`` wide (the model's logits).

    xgrammar reads an added special token such as ``<|eot_id|>`` as its literal text, so a grammar
    that allows ``<`` could emit it and the detokenized text (special tokens skipped) would no
    longer match. Special tokens are therefore given an empty string, which xgrammar never allows
    as text (ids the tokenizer does not have are empty too). Stop tokens stay stop tokens.
    """
    base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    special = special_token_ids(tokenizer)
    if not special:
        return base
    vocab: list[bytes | str] = [""] * vocab_size
    for token, idx in tokenizer.get_vocab().items():
        if idx < vocab_size and idx not in special:
            vocab[idx] = token
    return xgr.TokenizerInfo.from_vocab_and_metadata(vocab, base.dump_metadata())


def control_free_bitmask(info: xgr.TokenizerInfo, vocab_size: int) -> torch.Tensor:
    """int32 ``[ceil(V / 32)]``: the bit of each token whose bytes hold no control character (< 0x20)."""
    bits = torch.zeros((vocab_size + 31) // 32 * 32, dtype=torch.bool)
    vocab = info.decoded_vocab
    bits[: len(vocab)] = torch.tensor([not any(b < 0x20 for b in tok) for tok in vocab], dtype=torch.bool)
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    words = (bits.view(-1, 32).to(torch.int64) * weights).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def utf8_only(grammar: xgr.Grammar) -> xgr.Grammar:
    """``grammar`` with no character class matching a UTF-16 surrogate (invalid as UTF-8)."""
    text = str(grammar)
    patched = exclude_surrogates(text)
    if patched == text:
        return grammar
    try:
        return xgr.Grammar.from_ebnf(patched)
    except Exception as e:  # noqa: BLE001 - never fail a valid grammar because of the rewrite
        logger.warning("could not exclude surrogates from a grammar (%s); compiling it unchanged", compiler_message(e))
        return grammar


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, backend: XGrammarBackend, matcher: xgr.GrammarMatcher, json_text: bool) -> None:
        self.backend = backend
        self._backend = backend
        self._m = matcher
        self.json_text = json_text  # JSON: also drop tokens with control characters

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)
        if self.json_text:
            bitmask[row] &= self._backend.json_allowed()

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())


class AdaptiveFill:
    """One C++ call fills a batch of rows, on xgrammar's thread pool only when that pays.

    Most grammar states fill a row in microseconds, less than handing work to the pool costs (about
    0.1 ms here); a few (a ``maxLength`` string over a 128k vocabulary) take milliseconds a row. The
    serial fill is timed; the pool is used while the expected serial time of a batch exceeds
    ``PARALLEL_ABOVE_S``, and every ``PROBE_EVERY``-th pooled fill runs serially to re-measure.
    """

    PARALLEL_ABOVE_S = 1e-3
    PROBE_EVERY = 32

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._serial = xgr.BatchGrammarMatcher(max_threads=1)
        self._pool = xgr.BatchGrammarMatcher(max_threads=threads) if threads > 1 else None
        self.row_cost_s = 0.0  # running estimate of one row's serial fill
        self._pooled = 0

    def __call__(self, handles: list[xgr.GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        pool = self._pool is not None and len(handles) > 1 and self.row_cost_s * len(handles) > self.PARALLEL_ABOVE_S
        if pool and self._pooled % self.PROBE_EVERY != self.PROBE_EVERY - 1:
            self._pooled += 1
            self._pool.batch_fill_next_token_bitmask(handles, bitmask, rows)  # type: ignore[union-attr]
            return
        self._pooled += pool
        t0 = time.perf_counter()
        self._serial.batch_fill_next_token_bitmask(handles, bitmask, rows)
        per_row = (time.perf_counter() - t0) / len(handles)
        self.row_cost_s = per_row if self.row_cost_s == 0.0 else 0.7 * self.row_cost_s + 0.3 * per_row


class XGrammarCompiled(CompiledGrammar):
    def __init__(self, backend: XGrammarBackend, kind: str, spec: str, compiled: xgr.CompiledGrammar) -> None:
        super().__init__(kind, spec)
        self.backend = backend
        self.compiled = compiled

    def new_matcher(self) -> GrammarMatcher:
        return XGrammarMatcher(self.backend, xgr.GrammarMatcher(self.compiled), self.kind == "json_schema")


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], num_threads: int = 1,
        any_whitespace: bool = False,
    ) -> None:
        super().__init__(tokenizer, vocab_size, stop_token_ids, num_threads)
        self.any_whitespace = any_whitespace
        self.info = tokenizer_info(tokenizer, vocab_size, list(stop_token_ids))
        # xgrammar's own cache stays off: GrammarCache keeps compiled grammars, once per key.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max(1, num_threads), cache_enabled=False)
        self._cuda_backend: _Kernel | None = None
        self._fill = AdaptiveFill(max(1, num_threads))
        self._json_allowed: torch.Tensor | None = None
        self._json_lock = threading.Lock()

    def json_allowed(self) -> torch.Tensor:
        """Tokens a compact JSON text may contain (built once, on the first JSON compile)."""
        with self._json_lock:
            if self._json_allowed is None:
                self._json_allowed = control_free_bitmask(self.info, self.vocab_size)
            return self._json_allowed

    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        try:
            if kind == "regex":
                grammar = xgr.Grammar.from_regex(spec)
            elif kind == "json_schema":
                grammar = xgr.Grammar.from_json_schema(self._schema(spec), any_whitespace=self.any_whitespace)
                self.json_allowed()
            elif kind == "ebnf":
                grammar = xgr.Grammar.from_ebnf(spec)
            else:
                raise ValueError(f"unknown grammar kind {kind!r}; choose regex, json_schema or ebnf")
            compiled = self.compiler.compile_grammar(utf8_only(grammar))
        except ValueError as e:
            if str(e).startswith(f"{kind}: "):
                raise
            raise invalid_grammar(kind, compiler_message(e)) from None
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError and its own types
            raise invalid_grammar(kind, compiler_message(e)) from None
        return XGrammarCompiled(self, kind, spec, compiled)

    @staticmethod
    def _schema(spec: str) -> str:
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as e:
            raise invalid_grammar("json_schema", f"not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise invalid_grammar("json_schema", f"a schema is a JSON object, got {type(schema).__name__}")
        return spec

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        handles = [m._m for m in matchers if isinstance(m, XGrammarMatcher)]
        if len(handles) != len(matchers):
            super().fill_bitmask(matchers, bitmask, rows)
            return
        self._fill(handles, bitmask, rows)
        json_rows = [row for m, row in zip(matchers, rows, strict=True) if isinstance(m, XGrammarMatcher) and m.json_text]
        if json_rows:
            bitmask[json_rows] &= self.json_allowed()

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(rows, self.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        indices = None if rows == list(range(logits.shape[0])) else rows
        backend: _Kernel
        if logits.device.type == "cpu":
            backend = "cpu"
        elif logits.device.type == "cuda":
            backend = self._cuda_backend or self._pick_cuda_backend()
        else:
            backend = "torch_native"
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=indices, backend=backend)

    def _pick_cuda_backend(self) -> _Kernel:
        try:
            import triton  # noqa: F401

            self._cuda_backend = "triton"
        except ImportError:
            self._cuda_backend = "torch_native"
        return self._cuda_backend
