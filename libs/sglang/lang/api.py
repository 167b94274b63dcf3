"""The expressions a program appends: ``gen``, ``select``, ``image`` and the chat roles."""

from __future__ import annotations

import functools
import os
from typing import Any

from sglang.lang.choices import check_choices
from sglang.lang.ir import (
    Expr,
    ExprList,
    Gen,
    GenParams,
    Image,
    RoleBegin,
    RoleEnd,
    Select,
    dtype_regex,
    json_schema_string,
    to_expr,
)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    dtype: Any = None,
    choices: list[str] | None = None,
    regex: str | None = None,
    json_schema: Any = None,
    ebnf: str | None = None,
) -> Expr:
    """Generate text into variable ``name``. ``choices`` makes it a :func:`select`; ``regex``,
    ``json_schema`` (dict, JSON string or pydantic model class), ``ebnf`` and ``dtype`` (int, float,
    bool, str) constrain the output (at most one of them)."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"gen name must be a string, got {type(name).__name__}")
    constraints = [k for k, v in (("regex", regex), ("json_schema", json_schema), ("ebnf", ebnf), ("dtype", dtype))
                   if v is not None]
    if choices is not None:
        if constraints:
            raise ValueError(f"gen takes choices or {constraints[0]}, not both")
        return Select(name, check_choices(choices), temperature if temperature is not None else 0.0)
    if len(constraints) > 1:
        raise ValueError(f"gen takes at most one of regex, json_schema, ebnf, dtype; got {constraints}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0):
        raise ValueError(f"max_tokens must be a non-negative int, got {max_tokens!r}")
    params = GenParams(
        max_new_tokens=max_tokens, stop=stop, stop_token_ids=stop_token_ids, temperature=temperature, top_p=top_p,
        top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        ignore_eos=ignore_eos, regex=regex if dtype is None else dtype_regex(dtype),
        json_schema=json_schema_string(json_schema) if json_schema is not None else None, ebnf=ebnf,
    )
    return Gen(name, params)


def gen_int(name: str | None = None, **kwargs: Any) -> Expr:
    return gen(name, dtype=int, **kwargs)


def gen_string(name: str | None = None, **kwargs: Any) -> Expr:
    return gen(name, dtype=str, **kwargs)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0) -> Expr:
    """Append the choice the model scores highest (mean token logprob; see ``sglang.lang.choices``)."""
    return Select(name, check_choices(choices if choices is not None else []), temperature)


def image(path_or_bytes: str | bytes) -> Expr:
    """An image (file path, URL or data URI string, or raw bytes). Needs a vision-language model."""
    if isinstance(path_or_bytes, bytes):
        if not path_or_bytes:
            raise ValueError("image bytes are empty")
    elif isinstance(path_or_bytes, str):
        local = not path_or_bytes.startswith(("http://", "https://", "data:"))
        if local and not os.path.exists(path_or_bytes):
            raise FileNotFoundError(f"image file not found: {path_or_bytes!r}")
    else:
        raise TypeError(f"image takes a path or bytes, got {type(path_or_bytes).__name__}")
    return Image(path_or_bytes)


def _role(role: str, expr: Any) -> ExprList:
    inner = [] if expr is None else [to_expr(expr)]
    return ExprList([RoleBegin(role), *inner, RoleEnd(role)])


def system(expr: Any = None) -> ExprList:
    return _role("system", expr)


def user(expr: Any = None) -> ExprList:
    return _role("user", expr)


def assistant(expr: Any = None) -> ExprList:
    return _role("assistant", expr)


# The explicit forms: s += sgl.user_begin() + "..." + sgl.user_end()
system_begin = functools.partial(RoleBegin, "system")
system_end = functools.partial(RoleEnd, "system")
user_begin = functools.partial(RoleBegin, "user")
user_end = functools.partial(RoleEnd, "user")
assistant_begin = functools.partial(RoleBegin, "assistant")
assistant_end = functools.partial(RoleEnd, "assistant")
