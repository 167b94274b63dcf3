"""SGLang mesh: a fast serving framework for LLMs, built as an asyncio microservice mesh.

``sglang.Engine`` is the in-process engine. Heavy modules load lazily on first attribute access,
so ``import sglang`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sglang.engine.engine import Engine
    from sglang.engine.sampling.params import SamplingParams

_LAZY = {
    "Engine": "sglang.engine.engine",
    "SamplingParams": "sglang.engine.sampling.params",
}

__all__ = ["Engine", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sglang' has no attribute {name!r}")
