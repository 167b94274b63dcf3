"""Grammar backends: compile ``regex`` / ``json_schema`` / ``ebnf`` into token-level matchers.

Three objects, three lifetimes:

* :class:`GrammarBackend`, one per engine: knows the tokenizer's vocabulary (built once from the HF
  tokenizer, sized to the model's logits: ids the tokenizer does not have are never allowed) and
  compiles grammars. ``compile`` may run on any thread, concurrently; it is slow (ms to 100s of
  ms) and never runs on the scheduler thread.
* :class:`CompiledGrammar`, one per distinct ``(kind, spec)``: immutable, shared by every request
  that asks for it (``GrammarCache`` keeps them).
* :class:`GrammarMatcher`, one per sample: the position in the grammar after the tokens accepted
  so far. Created on the caller's thread, then touched only by the scheduler thread.

A matcher ends (``is_terminated``) only by accepting a stop token, and stop tokens are allowed by
the mask only where the grammar may end; a mask row therefore always allows at least one token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch

GrammarKind = Literal["regex", "json_schema", "ebnf"]
GRAMMAR_KINDS: tuple[GrammarKind, ...] = ("regex", "json_schema", "ebnf")
_WHAT = {"regex": "regular expression", "json_schema": "JSON schema", "ebnf": "EBNF grammar"}


class GrammarBackendUnavailable(ValueError):
    """The backend's library is missing. A ``ValueError`` (so the request is refused with a 400 that
    names the parameter) raised only when a request asks for a grammar."""


def invalid_grammar(kind: str, detail: str) -> ValueError:
    """The error for a spec the compiler rejects: names the parameter, keeps the compiler's words."""
    return ValueError(f"{kind}: invalid {_WHAT.get(kind, kind)}: {detail.strip()}; fix {kind} and retry")


class GrammarMatcher(ABC):
    """Per-sample grammar state. Not thread-safe: the scheduler thread owns it after creation."""

    backend: GrammarBackend

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (CPU int32, one bit per token id)."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (and no change) when the grammar does not allow it."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once a stop token was accepted where the grammar may end."""


class CompiledGrammar(ABC):
    """An immutable compiled grammar; ``new_matcher`` may be called from any thread."""

    def __init__(self, kind: str, spec: str) -> None:
        self.kind = kind
        self.spec = spec

    @abstractmethod
    def new_matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar."""


class GrammarBackend(ABC):
    """One per engine. ``tokenizer`` is the HF tokenizer; ``vocab_size`` the width of the model's
    logits (>= the tokenizer's size; extra ids are always masked out); ``stop_token_ids`` end a
    grammar (the engine's EOS ids)."""

    name: str = "base"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], num_threads: int = 1) -> None:
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.num_threads = num_threads

    @abstractmethod
    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Compile ``spec`` as ``kind`` (one of ``GRAMMAR_KINDS``). Thread-safe. Raises
        ``ValueError`` from :func:`invalid_grammar` when the compiler rejects it."""

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Fill ``bitmask[rows[i]]`` from ``matchers[i]`` (all of this backend). A backend may do
        it in parallel; the default fills one row after the other."""
        for m, row in zip(matchers, rows, strict=True):
            m.fill_bitmask(bitmask, row)

    @abstractmethod
    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """A CPU int32 bitmask ``[rows, ceil(vocab_size / 32)]``; the caller owns it and may reuse it."""

    @abstractmethod
    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set ``logits[r, t] = -inf`` IN PLACE for each ``r`` in ``rows`` and every token ``t`` whose
        bit in ``bitmask[r]`` is 0. ``bitmask`` is on the logits' device; other rows are untouched."""
