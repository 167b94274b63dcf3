"""``sgl.OpenAI(model, base_url=..., api_key=...)``: programs against any OpenAI-compatible server,
through the real ``openai`` client.

Chat models (the default): roles become ``messages``; a ``gen`` must be the whole content of an
assistant turn (``s += sgl.assistant(sgl.gen("answer"))``), as the chat API cannot continue a
partial assistant message. The state's text joins the turns' contents with no role markers
(``s.messages()`` holds the structure). ``is_chat_model=False`` uses ``/v1/completions`` on the
state's text instead.

Choices (``select``, ``gen(choices=...)``): the chat API gives no prompt logprobs, so they cannot be
scored. ``choices_method="constrained"`` (default) asks for a greedy answer constrained by the regex
``(choice1|choice2|...)`` (the ``regex`` extension of SGLang-compatible servers);
``choices_method="match"`` works with any server: a greedy answer, then the choice it starts with,
else the choice sharing the longest prefix with it (ties: the first).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, Literal

from sglang.lang.backends.base import Backend, GenInput, meta_of
from sglang.lang.choices import ChoiceDecision
from sglang.lang.ir import DEFAULTS, GenParams

PLAIN_ROLES: dict[str, Any] = {"system": ["", ""], "user": ["", ""], "assistant": ["", ""], "stop_token_ids": []}
_EXTRA = ("top_k", "min_p", "ignore_eos", "regex", "ebnf", "stop_token_ids")


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def match_choice(answer: str, choices: list[str]) -> int:
    """Index of the choice ``answer`` starts with (the longest such), else of the choice sharing the
    longest prefix with it (ties: the first)."""
    starts = [i for i, c in enumerate(choices) if answer.startswith(c)]
    if starts:
        return max(starts, key=lambda i: (len(choices[i]), -i))
    return max(range(len(choices)), key=lambda i: (_common_prefix(answer, choices[i]), -i))


class OpenAI(Backend):
    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 is_chat_model: bool = True, choices_method: Literal["constrained", "match"] = "constrained",
                 **client_kwargs: Any) -> None:
        try:
            import openai
        except ImportError as e:  # pragma: no cover - openai is a dev dependency
            raise ImportError("sgl.OpenAI needs the openai package: pip install openai") from e
        if choices_method not in ("constrained", "match"):
            raise ValueError(f"choices_method must be 'constrained' or 'match', got {choices_method!r}")
        self._openai = openai
        self.model_name = model
        self.is_chat_model = is_chat_model
        self.choices_method = choices_method
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = openai.OpenAI(base_url=base_url, api_key=key, **client_kwargs)
        self.base_url = str(self.client.base_url)

    def chat_roles(self) -> dict[str, Any] | None:
        return PLAIN_ROLES

    # ------------------------------------------------------------------ requests

    def _kwargs(self, params: GenParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model_name, "max_tokens": params.max_new_tokens}
        for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "stop"):
            value = getattr(params, name)
            if value is not None and value != DEFAULTS.get(name):
                kw[name] = value
        extra = {n: getattr(params, n) for n in _EXTRA if getattr(params, n) not in (None, DEFAULTS.get(n))}
        if params.json_schema is not None:
            if self.is_chat_model:
                import json

                kw["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "output", "schema": json.loads(params.json_schema)}}
            else:
                extra["json_schema"] = params.json_schema
        if extra:
            kw["extra_body"] = extra
        return kw

    def _messages(self, inp: GenInput) -> list[dict[str, Any]]:
        if inp.role != "assistant" or inp.role_text:
            raise ValueError(
                "with an OpenAI chat model, sgl.gen/select must be the whole content of an assistant turn: "
                "s += sgl.assistant(sgl.gen('answer'))"
            )
        if not inp.messages:
            raise ValueError("an OpenAI chat model needs at least one message before the assistant turn")
        return inp.messages

    def _create(self, inp: GenInput, params: GenParams, stream: bool) -> Any:
        try:
            if self.is_chat_model:
                messages: Any = self._messages(inp)
                return self.client.chat.completions.create(messages=messages, stream=stream, **self._kwargs(params))
            return self.client.completions.create(prompt=inp.text, stream=stream, **self._kwargs(params))
        except self._openai.APIConnectionError as e:
            raise ConnectionError(f"cannot reach the OpenAI-compatible server at {self.base_url}: {e}") from None

    def generate(self, inp: GenInput, params: GenParams) -> tuple[str, dict[str, Any]]:
        resp = self._create(inp, params, stream=False)
        choice = resp.choices[0]
        text = (choice.message.content if self.is_chat_model else choice.text) or ""
        return text, meta_of(_usage_meta(resp.usage, choice.finish_reason))

    def generate_stream(self, inp: GenInput, params: GenParams) -> Iterator[tuple[str, dict[str, Any] | None]]:
        finish = None
        for chunk in self._create(inp, params, stream=True):
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            piece = (c.delta.content if self.is_chat_model else c.text) or ""
            if piece:
                yield piece, None
            finish = c.finish_reason or finish
        yield "", meta_of({"finish_reason": finish})

    def select(self, inp: GenInput, choices: list[str], temperature: float) -> ChoiceDecision:
        longest = max(len(c) for c in choices)
        params = GenParams(max_new_tokens=longest + 8, temperature=0.0)
        if self.choices_method == "constrained":
            params.regex = "(" + "|".join(re.escape(c) for c in choices) + ")"
        answer, meta = self.generate(inp, params)
        index = match_choice(answer, choices)
        meta["answer"] = answer
        return ChoiceDecision(choices[index], index, [], meta)


def _usage_meta(usage: Any, finish_reason: str | None) -> dict[str, Any]:
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    return {
        "prompt_tokens": getattr(usage, "prompt_tokens", None),
        "completion_tokens": getattr(usage, "completion_tokens", None),
        "cached_tokens": getattr(details, "cached_tokens", None) if details is not None else None,
        "finish_reason": finish_reason,
    }
