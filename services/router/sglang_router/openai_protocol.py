"""OpenAI request bodies (chat completions, completions) as pydantic models, and their mapping to
SGLang sampling parameters.

Bodies are parsed from the raw bytes in strict mode (``"10"`` is not an integer, ``true`` is not a
number), so a wrong type is a 400 that names the field, as the OpenAI API does. Unknown fields are
ignored (clients send ``user``, ``store``, ``metadata``, ...). SGLang's extra sampling fields
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``regex``, ``ebnf``,
``stop_token_ids``, ``skip_special_tokens``, ``no_stop_trim``) are accepted as SGLang's OpenAI server
accepts them.

Field mapping: ``max_completion_tokens`` / ``max_tokens`` -> ``max_new_tokens``; ``min_tokens`` ->
``min_new_tokens``; ``logprobs`` + ``top_logprobs`` (chat) or ``logprobs: k`` (completions) ->
``return_logprob`` + ``top_logprobs_num``; ``response_format`` ``json_schema`` -> ``json_schema`` (the
schema as a JSON string), ``json_object`` -> ``json_schema`` ``{"type": "object"}`` (any JSON object);
the worker's grammar backend enforces them, and its errors about ``json_schema`` name
``response_format`` (see ``openai_api.api_param_errors``).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sglang_router.errors import RouterError, bad_request

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ContentPart(_Body):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            d["content"] = [p.model_dump(exclude_none=True) for p in self.content]
        return d


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(_Body):
    """Fields shared by chat and completions (OpenAI's, then SGLang's extensions)."""

    model: str | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # SGLang extensions
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    stop_token_ids: list[int] | None = None
    regex: str | None = None
    ebnf: str | None = None
    no_stop_trim: bool | None = None

    def _max_new_tokens(self) -> int | None:
        return None

    def _response_format(self) -> ResponseFormat | None:
        return None

    def sampling_params(self) -> dict[str, Any]:
        """SGLang sampling parameters (only what the request set; ``n`` included)."""
        d: dict[str, Any] = {"n": self.n}
        max_new = self._max_new_tokens()
        if max_new is not None:
            d["max_new_tokens"] = max_new
        for name in (
            "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
            "repetition_penalty", "ignore_eos", "skip_special_tokens", "stop_token_ids", "regex", "ebnf",
            "no_stop_trim",
        ):
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        if self.min_tokens is not None:
            d["min_new_tokens"] = self.min_tokens
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
            if stops:
                d["stop"] = stops
        if self.logit_bias:
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                try:
                    tok = int(key)
                except ValueError:
                    raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
                if not -100.0 <= value <= 100.0:
                    raise bad_request(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
                bias[tok] = value
            d["logit_bias"] = bias
        fmt = self._response_format()
        if fmt is not None and fmt.type == "json_object":
            d["json_schema"] = json.dumps({"type": "object"})
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise bad_request("response_format.json_schema.schema is required", "response_format.json_schema")
            d["json_schema"] = json.dumps(fmt.json_schema.schema_)
        return d

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    chat_template_kwargs: dict[str, Any] | None = None

    def _max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _response_format(self) -> ResponseFormat | None:
        return self.response_format

    def check(self) -> None:
        """Cross-field rules pydantic's per-field bounds cannot say."""
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text":
                        param = f"messages[{i}].content[{j}].type"
                        raise bad_request(
                            f"{param}: content parts of type {part.type!r} are not supported by this text-only model",
                            param,
                        )

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template_dict() for m in self.messages]


PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)

    def _max_new_tokens(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of must equal n (server-side best-of is not supported)", "best_of")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs is not supported", "echo")
        if isinstance(self.prompt, list) and not self.prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if isinstance(self.prompt, str) and not self.prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], list) and any(not p for p in self.prompt):
            raise bad_request("prompt token lists must not be empty", "prompt")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Parsing and error formatting
# ---------------------------------------------------------------------------------------------

_MODEL_NAMES = {"ContentPart", "ChatMessage", "StreamOptions", "JsonSchemaFormat", "ResponseFormat"}


def _is_tag(part: str | int) -> bool:
    if not isinstance(part, str):
        return False
    return part in _TYPE_TAGS or part in _MODEL_NAMES or "[" in part or part.startswith(("function-", "json-or-python"))


def error_param(loc: tuple[str | int, ...]) -> str | None:
    """``("messages", 0, "content", "str")`` -> ``"messages[0].content"`` (union tags dropped)."""
    out = ""
    for part in loc:
        if _is_tag(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(e: ValidationError) -> RouterError:
    """One 400 naming the first offending field (union alternatives merged into one message)."""
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return RouterError(400, f"the request body is not valid JSON: {first['msg']}", param=None, code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("the request body must be a JSON object", None)
    param = error_param(tuple(first["loc"]))
    msgs: list[str] = []
    for err in errors:
        if error_param(tuple(err["loc"])) == param and err["msg"] not in msgs:
            msgs.append(err["msg"])
    message = " or ".join(m if i == 0 else m[0].lower() + m[1:] for i, m in enumerate(msgs))
    if first["type"] != "missing" and first["loc"]:
        message += f" (got {type(first.get('input')).__name__})" if first["type"].endswith("_type") else ""
    return bad_request(f"{param}: {message}" if param else message, param)


T = TypeVar("T", bound=BaseModel)


def parse_body(cls: type[T], raw: bytes) -> T:
    """Validate ``raw`` JSON into ``cls``; raise a 400 :class:`RouterError` naming the field."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", None)
    try:
        return cls.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
