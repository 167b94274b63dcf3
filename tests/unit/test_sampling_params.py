"""SamplingParams: SGLang names and defaults, from_dict, normalize, verify."""

from __future__ import annotations

from typing import Any

import pytest
from sglang.engine.sampling import SamplingParams

pytestmark = pytest.mark.unit

VOCAB = 100


def test_defaults_match_sglang() -> None:
    p = SamplingParams()
    assert p.max_new_tokens == 128
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.min_p == 0.0
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.min_new_tokens == 0
    assert p.stop is None and p.stop_token_ids is None
    assert p.ignore_eos is False
    assert p.skip_special_tokens is True and p.spaces_between_special_tokens is True
    assert p.n == 1 and p.seed is None
    assert p.regex is None and p.json_schema is None and p.ebnf is None
    assert p.logit_bias is None and p.no_stop_trim is False
    p.verify(VOCAB)  # defaults are valid
    assert not p.is_greedy


def test_from_dict_none_gives_defaults() -> None:
    assert SamplingParams.from_dict(None) == SamplingParams()
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_from_dict_round_trip() -> None:
    d: dict[str, Any] = {
        "max_new_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "frequency_penalty": 0.3,
        "presence_penalty": -0.2,
        "repetition_penalty": 1.1,
        "min_new_tokens": 2,
        "stop": ["\n", "END"],
        "stop_token_ids": [3, 4],
        "ignore_eos": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "n": 2,
        "seed": 42,
        "regex": "[a-z]+",
        "logit_bias": {5: -1.0},
        "no_stop_trim": True,
    }
    p = SamplingParams.from_dict(d)
    for key, value in d.items():
        assert getattr(p, key) == value
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert p.to_dict()["seed"] == 42
    p.verify(VOCAB)


def test_unknown_key_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"unknown sampling parameter 'foo'; known: max_new_tokens"):
        SamplingParams.from_dict({"temperature": 0.5, "foo": 1})
    # No aliases: max_tokens is the OpenAI name, mapped by the OpenAI layer.
    with pytest.raises(ValueError, match="'max_tokens'"):
        SamplingParams.from_dict({"max_tokens": 5})


def test_from_dict_rejects_non_dict() -> None:
    with pytest.raises(ValueError, match="sampling_params"):
        SamplingParams.from_dict([1, 2])  # type: ignore[arg-type]


def test_normalize() -> None:
    p = SamplingParams(stop="###", logit_bias={"7": 2.5, 9: -1.0}).normalize()
    assert p.stop == ["###"]
    assert p.logit_bias == {7: 2.5, 9: -1.0}
    assert all(isinstance(k, int) for k in p.logit_bias)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"seven": 1.0}).normalize()


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("max_new_tokens", -1, "max_new_tokens must be >= 0, got -1"),
        ("temperature", -0.1, "temperature must be >= 0"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_p", 1.5, "top_p must be in (0, 1]"),
        ("top_k", 0, "top_k must be -1 (off) or >= 1, got 0"),
        ("top_k", -2, "top_k"),
        ("min_p", -0.1, "min_p must be in [0, 1]"),
        ("min_p", 1.1, "min_p"),
        ("frequency_penalty", 2.5, "frequency_penalty must be in [-2, 2]"),
        ("frequency_penalty", -2.1, "frequency_penalty"),
        ("presence_penalty", 3.0, "presence_penalty must be in [-2, 2]"),
        ("presence_penalty", -3.0, "presence_penalty"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
        ("repetition_penalty", -1.0, "repetition_penalty"),
        ("min_new_tokens", -1, "min_new_tokens must be in [0, max_new_tokens=128]"),
        ("min_new_tokens", 129, "min_new_tokens"),
        ("n", 0, "n must be >= 1, got 0"),
        ("stop_token_ids", [VOCAB], f"stop_token_ids must lie in [0, vocab_size={VOCAB})"),
        ("stop_token_ids", [-1], "stop_token_ids"),
        ("logit_bias", {VOCAB: 1.0}, "logit_bias keys must lie in [0, vocab_size"),
        ("logit_bias", {"-3": 1.0}, "logit_bias"),
        # wrong types
        ("temperature", "hot", "temperature must be a number, got str"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("top_p", None, "top_p must be a number"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("max_new_tokens", "10", "max_new_tokens must be an integer"),
        ("max_new_tokens", True, "max_new_tokens must be an integer"),
        ("n", 1.0, "n must be an integer"),
        ("seed", "abc", "seed must be an integer"),
        ("ignore_eos", "yes", "ignore_eos must be true or false"),
        ("stop", 5, "stop must be a string or a list of strings"),
        ("stop", ["a", 1], "stop must be a string or a list of strings"),
        ("stop_token_ids", 5, "stop_token_ids must be a list"),
        ("stop_token_ids", ["a"], "stop_token_ids must be an integer"),
        ("logit_bias", [1, 2], "logit_bias must be an object"),
        ("logit_bias", {"x": 1.0}, "logit_bias keys must be token ids"),
        ("logit_bias", {1: "big"}, "logit_bias values must be numbers"),
        ("regex", 5, "regex must be a string"),
    ],
)
def test_verify_rejects_and_names_parameter(field: str, value: Any, needle: str) -> None:
    p = SamplingParams(**{field: value})
    with pytest.raises(ValueError) as excinfo:
        p.verify(VOCAB)
    assert field in str(excinfo.value)
    assert needle in str(excinfo.value)


def test_verify_accepts_boundaries() -> None:
    assert SamplingParams(
        max_new_tokens=0,
        temperature=0.0,
        top_p=1.0,
        top_k=1,
        min_p=1.0,
        frequency_penalty=-2.0,
        presence_penalty=2.0,
        repetition_penalty=0.01,
        stop_token_ids=[0, VOCAB - 1],
        logit_bias={"0": -100.0, VOCAB - 1: 100.0},
    ).verify(VOCAB) is None
    assert SamplingParams(max_new_tokens=5, min_new_tokens=5, top_k=-1, min_p=0.0).verify(VOCAB) is None


def test_at_most_one_grammar() -> None:
    with pytest.raises(ValueError, match="at most one of regex, json_schema, ebnf") as excinfo:
        SamplingParams(regex="a+", json_schema="{}").verify(VOCAB)
    assert "regex and json_schema" in str(excinfo.value)
    SamplingParams(ebnf="root ::= 'a'").verify(VOCAB)


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"top_k": 1}, True),
        ({"temperature": 0.0, "top_k": 50}, True),
        ({"temperature": 1e-7}, True),
        ({"temperature": 0.01}, False),
        ({"temperature": 0.7, "top_k": 2}, False),
        ({}, False),
    ],
)
def test_is_greedy(kwargs: dict[str, Any], greedy: bool) -> None:
    assert SamplingParams(**kwargs).is_greedy is greedy
