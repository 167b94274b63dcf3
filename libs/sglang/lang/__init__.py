"""The frontend language (``import sglang as sgl``): programs that interleave text, generation,
choices, roles and forks, run against a backend.

    @sgl.function
    def qa(s, question):
        s += sgl.system("You are helpful.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000"))
    state = qa.run(question="What is the capital of France?")
    print(state["answer"])

Nothing here imports torch: the Engine backend takes an engine the caller built.
"""

from __future__ import annotations

from sglang.lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    gen_int,
    gen_string,
    image,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from sglang.lang.backends import Backend, EngineBackend, OpenAI, RuntimeEndpoint, ServerError
from sglang.lang.function import SglFunction, function, get_default_backend, set_default_backend
from sglang.lang.state import ForkGroup, ProgramState

__all__ = [
    "Backend", "EngineBackend", "ForkGroup", "OpenAI", "ProgramState", "RuntimeEndpoint", "ServerError",
    "SglFunction", "assistant", "assistant_begin", "assistant_end", "function", "gen", "gen_int", "gen_string",
    "get_default_backend", "image", "select", "set_default_backend", "system", "system_begin", "system_end",
    "user", "user_begin", "user_end",
]
