"""OpenAI request parsing: every validation error is a 400 whose message and ``param`` name the
field; OpenAI fields map to SGLang sampling parameters."""

from __future__ import annotations

import json

import pytest
from sglang_router.errors import RouterError, param_of_value_error
from sglang_router.native_api import GenerateRequest
from sglang_router.openai_protocol import ChatCompletionRequest, CompletionRequest, error_param, parse_body

pytestmark = pytest.mark.unit

MSG = [{"role": "user", "content": "hi"}]


def chat_error(body: object) -> RouterError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RouterError) as e:
        req = parse_body(ChatCompletionRequest, raw)
        req.check()
        req.sampling_params()
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "m"}, "messages", "Field required"),
        ({"messages": "hi"}, "messages", "valid array"),
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "Field required"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid string"),
        ({"messages": MSG, "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
        ({"messages": MSG, "max_tokens": "10"}, "max_tokens", "valid integer (got str)"),
        ({"messages": MSG, "max_tokens": 1.5}, "max_tokens", "valid integer"),
        ({"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
        ({"messages": MSG, "temperature": "hot"}, "temperature", "valid number"),
        ({"messages": MSG, "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"messages": MSG, "top_p": 0}, "top_p", "greater than 0"),
        ({"messages": MSG, "n": 0}, "n", "greater than or equal to 1"),
        ({"messages": MSG, "n": True}, "n", "valid integer"),
        ({"messages": MSG, "stop": 5}, "stop", "valid string or input should be a valid array"),
        ({"messages": MSG, "stream": "yes"}, "stream", "valid boolean"),
        ({"messages": MSG, "seed": -1}, "seed", "greater than or equal to 0"),
        ({"messages": MSG, "presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
        ({"messages": MSG, "top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal to 20"),
        ({"messages": MSG, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"messages": MSG, "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"messages": MSG, "logit_bias": {"5": 500}}, "logit_bias", "[-100, 100]"),
        ({"messages": MSG, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "boolean"),
        ({"messages": MSG, "response_format": {"type": "xml"}}, "response_format.type", "'json_object'"),
        ({"messages": MSG, "response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
            "not supported",
        ),
    ],
)
def test_chat_errors_name_the_field(body: dict[str, object], param: str, words: str) -> None:
    e = chat_error(body)
    assert e.param == param
    assert e.message.startswith(param) or param in e.message
    assert words.lower() in e.message.lower()
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param, "code": e.code}}


def test_body_level_errors() -> None:
    e = chat_error(b"{not json")
    assert e.param is None and e.code == "invalid_json" and "not valid JSON" in e.message
    assert chat_error(b"[1, 2]").message == "the request body must be a JSON object"
    assert "empty" in chat_error(b"  ").message


def test_chat_maps_openai_fields_to_sglang_sampling_params() -> None:
    req = parse_body(ChatCompletionRequest, json.dumps({
        "model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}]}],
        "max_tokens": 7, "max_completion_tokens": 9, "temperature": 0, "top_p": 0.5, "n": 3, "seed": 4,
        "stop": "###", "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"12": -100},
        "logprobs": True, "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "top_k": 5, "min_tokens": 2, "ignore_eos": True, "unknown_field": 1,
    }).encode())
    req.check()
    assert req.sampling_params() == {
        "n": 3, "max_new_tokens": 9, "temperature": 0, "top_p": 0.5, "seed": 4, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "top_k": 5, "ignore_eos": True, "min_new_tokens": 2, "stop": ["###"],
        "logit_bias": {12: -100.0}, "json_schema": '{"type": "object"}',
    }
    assert req.include_usage and req.stream and req.logprobs and req.top_logprobs == 2
    assert req.template_messages() == [
        {"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}]}
    ]
    obj = parse_body(ChatCompletionRequest, json.dumps({"messages": MSG, "response_format": {"type": "json_object"}}).encode())
    assert obj.sampling_params() == {"n": 1, "json_schema": '{"type": "object"}'}
    assert obj.model is None and not obj.include_usage


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({}, "prompt", "Field required"),
        ({"prompt": 5}, "prompt", "valid string"),
        ({"prompt": [1, "a"]}, "prompt", "valid"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": []}, "prompt", "must not be empty"),
        ({"prompt": [[]]}, "prompt", "must not be empty"),
        ({"prompt": "x", "max_tokens": -3}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "x", "logprobs": 30}, "logprobs", "less than or equal to 20"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
        ({"prompt": "x", "best_of": 3}, "best_of", "must equal n"),
    ],
)
def test_completion_errors_name_the_field(body: dict[str, object], param: str, words: str) -> None:
    with pytest.raises(RouterError) as e:
        parse_body(CompletionRequest, json.dumps(body).encode()).check()
    assert (e.value.status, e.value.param) == (400, param)
    assert words.lower() in e.value.message.lower()


def test_completion_prompt_shapes_and_defaults() -> None:
    def prompts(p: object) -> list[object]:
        return parse_body(CompletionRequest, json.dumps({"prompt": p}).encode()).prompts()

    assert prompts("ab") == ["ab"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    req = parse_body(CompletionRequest, b'{"prompt": "x", "logprobs": 3, "echo": false}')
    assert req.sampling_params() == {"n": 1, "max_new_tokens": 16}  # OpenAI's completions default
    assert req.logprobs == 3


def test_native_generate_request() -> None:
    req = parse_body(GenerateRequest, b'{"input_ids": [[1, 2], [3]], "sampling_params": {"max_new_tokens": 2}}')
    assert req.input_ids == [[1, 2], [3]] and req.sampling_params == {"max_new_tokens": 2}
    with pytest.raises(RouterError) as e:
        parse_body(GenerateRequest, b'{"text": 5}')
    assert e.value.param == "text"
    with pytest.raises(RouterError) as e:
        parse_body(GenerateRequest, b'{"text": "a", "top_logprobs_num": -1}')
    assert e.value.param == "top_logprobs_num"


def test_error_param_and_value_error_param() -> None:
    assert error_param(("messages", 0, "content", "str")) == "messages[0].content"
    assert error_param(("stop", "list[str]", 2)) == "stop[2]"
    assert error_param(("logit_bias", "17")) == "logit_bias.17"
    assert error_param(()) is None
    assert param_of_value_error("max_new_tokens must be >= 0, got -1") == "max_new_tokens"
    assert param_of_value_error("unknown sampling parameter 'foo'; known: ...") == "foo"
    assert param_of_value_error("at most one of regex, json_schema, ebnf may be set") is None
