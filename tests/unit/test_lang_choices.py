"""select's decision from given logprobs, chat role markers from real HF chat templates, and the
frontend's argument errors (no backend needed)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import sglang as sgl
from sglang.engine.tokenizer import Tokenizer
from sglang.engine.tokenizer.chat import chat_role_markers
from sglang.lang.backends.openai import match_choice
from sglang.lang.choices import choice_logprobs, decide
from sglang.lang.ir import GenParams, dtype_regex, json_schema_string

from tests.helpers.tokenizers import make_tiny_tokenizer

pytestmark = pytest.mark.unit

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>\n\n{{ m['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant<|im_end|>\n\n{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
)


def test_decide_takes_the_argmax_of_mean_logprobs() -> None:
    d = decide(["a", "bb", "ccc"], [[-1.0], [-0.2, -0.6], [-0.1, -0.1, -2.0]])
    assert d.choice == "bb" and d.index == 1
    assert d.normalized_logprobs == pytest.approx([-1.0, -0.4, -2.2 / 3])
    assert d.meta_info["normalized_prompt_logprobs"] == d.normalized_logprobs


def test_decide_ties_go_to_the_first_choice_and_temperature_samples() -> None:
    assert decide(["x", "y"], [[-0.5], [-0.5]]).index == 0
    picks = {decide(["x", "y"], [[-0.1], [-9.0]], temperature=1e-3).choice for _ in range(20)}
    assert picks == {"x"}


def test_choice_logprobs_counts_a_merged_boundary_token_as_the_choice() -> None:
    # "I need a " + "calculator": the tokenizer merged the prefix's space into " calc".
    entries = [[-9.0, 1, "a"], [-1.0, 2, " calc"], [-2.0, 3, "ulator"]]
    assert choice_logprobs("calculator", entries, fallback_tokens=1) == [-1.0, -2.0]
    # Without token texts: the last ``fallback_tokens`` entries.
    assert choice_logprobs("calculator", [[-9.0, 1, None], [-3.0, 2, None]], fallback_tokens=1) == [-3.0]
    # Position 0 of a prompt has no logprob (None) and is skipped.
    assert choice_logprobs("ab", [[None, 0, None], [-0.5, 1, "ab"]], fallback_tokens=5) == [-0.5]
    with pytest.raises(ValueError, match="no prompt logprobs for choice 'x'"):
        choice_logprobs("x", [], fallback_tokens=1)


def test_match_choice_for_openai_servers() -> None:
    assert match_choice("search engine, because", ["search", "search engine"]) == 1
    assert match_choice("calcu", ["calculator", "search engine"]) == 0
    assert match_choice("zzz", ["calculator", "search engine"]) == 0


def test_chat_role_markers_chatml(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(make_tiny_tokenizer(str(tmp_path)))
    roles = chat_role_markers(tok)
    assert roles == {
        "system": ["<|im_start|>system\n", "<|im_end|>\n"],
        "user": ["<|im_start|>user\n", "<|im_end|>\n"],
        "assistant": ["<|im_start|>assistant\n", "<|im_end|>\n"],
        "stop_token_ids": [tok.hf.convert_tokens_to_ids("<|im_end|>")],
    }
    # The markers reproduce the template's own rendering of a conversation.
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert "".join(roles[m["role"]][0] + m["content"] + roles[m["role"]][1] for m in msgs) == \
        tok.apply_chat_template(msgs, add_generation_prompt=False)


def test_chat_role_markers_drop_a_bos_the_tokenizer_adds_itself(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(make_tiny_tokenizer(str(tmp_path), chat_template=LLAMA3_TEMPLATE))
    tok.hf.add_bos_token = True  # like Llama-3: encode() writes <s> itself
    assert tok.encode("a")[0] == tok.bos_token_id
    roles = chat_role_markers(tok)
    assert roles is not None
    assert roles["system"] == ["<|im_start|>system<|im_end|>\n\n", "</s>"]
    assert roles["user"] == ["<|im_start|>user<|im_end|>\n\n", "</s>"]
    assert roles["assistant"] == ["<|im_start|>assistant<|im_end|>\n\n", "</s>"]
    assert roles["stop_token_ids"] == [tok.eos_token_id]


def test_chat_role_markers_without_system_role_or_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(make_tiny_tokenizer(str(tmp_path / "a"), chat_template=NO_SYSTEM_TEMPLATE))
    roles = chat_role_markers(tok)
    assert roles is not None and "system" not in roles
    assert roles["user"] == ["[INST] ", " [/INST]"] and roles["assistant"] == ["", "</s>"]
    assert chat_role_markers(Tokenizer.from_pretrained(make_tiny_tokenizer(str(tmp_path / "b"), chat_template=None))) is None


def test_gen_params_resolve_gen_then_run_then_sglang_defaults() -> None:
    p = GenParams(max_new_tokens=5).resolved(GenParams(max_new_tokens=9, temperature=0.0))
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.regex) == (5, 0.0, 1.0, -1, None)
    assert "regex" not in p.to_sampling_params() and p.to_sampling_params()["temperature"] == 0.0


def test_gen_constraints_and_argument_errors() -> None:
    assert re.fullmatch(dtype_regex(int), "-42") and not re.fullmatch(dtype_regex(int), "4.2")
    assert json_schema_string({"type": "object"}) == '{"type": "object"}'

    from pydantic import BaseModel

    class Wand(BaseModel):
        wood: str
        length: float

    assert '"length"' in json_schema_string(Wand)
    with pytest.raises(ValueError, match="not valid JSON"):
        sgl.gen("x", json_schema="{nope")
    with pytest.raises(TypeError, match="json_schema must be"):
        sgl.gen("x", json_schema=3)
    with pytest.raises(ValueError, match="at least one choice; choices is empty"):
        sgl.select("x", choices=[])
    with pytest.raises(ValueError, match="at least one choice"):
        sgl.gen("x", choices=[])
    with pytest.raises(ValueError, match="choices or regex"):
        sgl.gen("x", choices=["a"], regex="a")
    with pytest.raises(ValueError, match="at most one of"):
        sgl.gen("x", regex="a", dtype=int)
    with pytest.raises(ValueError, match="max_tokens must be a non-negative int"):
        sgl.gen("x", max_tokens=-1)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        sgl.image("/nonexistent/missing.png")
    with pytest.raises(TypeError, match="cannot append int"):
        _ = "a" + sgl.gen("x") + 3


def test_select_is_a_gen_with_choices() -> None:
    e = sgl.gen("tool", choices=["calculator", "search engine"])
    assert type(e).__name__ == "Select" and e.choices == ["calculator", "search engine"] and e.temperature == 0.0
    assert math.isclose(sgl.select("t", ["a"], temperature=0.5).temperature, 0.5)
