"""Structured output: grammar backends (regex, JSON schema, EBNF) producing token bitmasks.

``GrammarCache`` compiles and keeps grammars (off the scheduler thread); each request sample gets
its own ``GrammarMatcher``; ``BitmaskFiller`` builds and applies one batched mask per step.
Importing this package does not import xgrammar: backends load on first use (``registry``).
"""

from sglang.engine.constrained.base import (
    GRAMMAR_KINDS,
    CompiledGrammar,
    GrammarBackend,
    GrammarBackendUnavailable,
    GrammarMatcher,
)
from sglang.engine.constrained.cache import GrammarCache
from sglang.engine.constrained.mask import BitmaskFiller, GrammarMask
from sglang.engine.constrained.registry import (
    available_grammar_backends,
    create_grammar_backend,
    register_grammar_backend,
)

__all__ = [
    "GRAMMAR_KINDS",
    "BitmaskFiller",
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarBackendUnavailable",
    "GrammarCache",
    "GrammarMask",
    "GrammarMatcher",
    "available_grammar_backends",
    "create_grammar_backend",
    "register_grammar_backend",
]
