"""Grammar backend registry with lazy imports: xgrammar loads only when a grammar is requested."""

from __future__ import annotations

from typing import Any

from sglang.engine.constrained.base import GrammarBackend, GrammarBackendUnavailable
from sglang.utils.registry import LazyRegistry

BACKENDS: LazyRegistry[GrammarBackend] = LazyRegistry(
    "grammar_backend", {"xgrammar": "sglang.engine.constrained.xgrammar_backend:XGrammarBackend"}
)

# What to install for a backend whose library is missing (xgrammar declares triton, about 1 GB,
# which it does not need on CPU: install it without dependencies).
INSTALL_HINTS = {"xgrammar": "pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2"}


def register_grammar_backend(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:Class"``."""
    BACKENDS.register(name, target)


def available_grammar_backends() -> list[str]:
    return BACKENDS.names()


def create_grammar_backend(name: str, **kwargs: Any) -> GrammarBackend:
    """Build backend ``name`` (see :class:`GrammarBackend` for the arguments). A missing library
    raises :class:`GrammarBackendUnavailable` saying what to install."""
    try:
        cls = BACKENDS.load(name)
    except ImportError as e:
        hint = INSTALL_HINTS.get(name, f"install the library of grammar backend {name!r}")
        raise GrammarBackendUnavailable(
            f"structured output needs the {name!r} grammar backend, which cannot be imported on this "
            f"server ({e}); the operator must run: {hint}"
        ) from None
    return cls(**kwargs)
