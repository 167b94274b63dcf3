"""Frontend backends: ``RuntimeEndpoint`` (the router's native API), ``OpenAI`` (any
OpenAI-compatible server) and ``EngineBackend`` (an in-process ``sglang.Engine``)."""

from __future__ import annotations

from sglang.lang.backends.base import Backend, GenInput
from sglang.lang.backends.engine import EngineBackend
from sglang.lang.backends.openai import OpenAI
from sglang.lang.backends.runtime_endpoint import RuntimeEndpoint, ServerError

__all__ = ["Backend", "EngineBackend", "GenInput", "OpenAI", "RuntimeEndpoint", "ServerError"]
