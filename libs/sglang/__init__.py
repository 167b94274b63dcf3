"""SGLang mesh: a fast serving framework for LLMs, built as an asyncio microservice mesh.

``sglang.Engine`` is the in-process engine; ``import sglang as sgl`` also gives the frontend language
(``sgl.function``, ``sgl.gen``, ``sgl.select``, roles, backends; see ``sglang.lang``). Heavy modules
load lazily on first attribute access, so ``import sglang`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sglang.engine.engine import Engine
    from sglang.engine.sampling.params import SamplingParams

_LANG = (
    "Backend", "EngineBackend", "OpenAI", "ProgramState", "RuntimeEndpoint", "ServerError", "assistant", "assistant_begin",
    "assistant_end", "function", "gen", "gen_int", "gen_string", "get_default_backend", "image", "select",
    "set_default_backend", "system", "system_begin", "system_end", "user", "user_begin", "user_end",
)

_LAZY = {
    "Engine": "sglang.engine.engine",
    "SamplingParams": "sglang.engine.sampling.params",
    **{name: "sglang.lang" for name in _LANG},
}

__all__ = ["Engine", "SamplingParams", "__version__", *_LANG]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sglang' has no attribute {name!r}")
