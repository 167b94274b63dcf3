"""Grammar backend, cache and batched mask (xgrammar on a tiny real byte-level BPE tokenizer).

Exact allowed-token sets are computed independently from the vocabulary (decode every id, match
the regex) and compared with the bitmask xgrammar fills.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
import torch
from sglang.engine.constrained import (
    BitmaskFiller,
    GrammarBackendUnavailable,
    GrammarCache,
    create_grammar_backend,
    register_grammar_backend,
)
from sglang.engine.constrained.base import GrammarBackend

from tests.helpers.tokenizers import make_tiny_tokenizer

pytestmark = pytest.mark.unit

TOK_VOCAB = 320
MODEL_VOCAB = 384  # wider logits than the tokenizer: ids 320..383 must never be allowed
EOS = 1  # </s>


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    path = make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=TOK_VOCAB)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def backend(hf_tokenizer: Any) -> GrammarBackend:
    return create_grammar_backend("xgrammar", tokenizer=hf_tokenizer, vocab_size=MODEL_VOCAB, stop_token_ids=[EOS])


def _allowed(bitmask: torch.Tensor, row: int = 0) -> set[int]:
    words = bitmask[row].tolist()
    return {t for t in range(MODEL_VOCAB) if (words[t // 32] >> (t % 32)) & 1}


def _texts(tok: Any) -> dict[int, str]:
    return {t: tok.decode([t], skip_special_tokens=False) for t in range(TOK_VOCAB)}


def test_regex_allowed_tokens_are_exact(backend: GrammarBackend, hf_tokenizer: Any) -> None:
    texts = _texts(hf_tokenizer)
    m = backend.compile("regex", "[0-9]{2}").new_matcher()
    bm = backend.allocate_bitmask(1)
    m.fill_bitmask(bm, 0)
    first = {t for t, s in texts.items() if re.fullmatch("[0-9]{1,2}", s)}
    assert len(first) >= 10  # the ten digit bytes at least
    assert _allowed(bm) == first
    one_digit = next(t for t, s in texts.items() if s == "7")
    assert m.accept_token(one_digit)
    m.fill_bitmask(bm, 0)
    assert _allowed(bm) == {t for t, s in texts.items() if re.fullmatch("[0-9]", s)}
    assert not m.is_terminated()
    assert m.accept_token(next(t for t, s in texts.items() if s == "3"))
    m.fill_bitmask(bm, 0)
    assert _allowed(bm) == {EOS}  # complete: only the stop token
    assert not m.accept_token(next(t for t, s in texts.items() if s == "4"))  # refused, state kept
    assert m.accept_token(EOS)
    assert m.is_terminated()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: vocabulary character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _utf8_prefix_chars(data: bytes) -> int | None:
    """Characters (a trailing partial one counts) if ``data`` can start a UTF-8 string, else None."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        text = dec.decode(data)
    except UnicodeDecodeError:
        return None
    return len(text) + (1 if dec.getstate()[0] else 0)


def test_special_and_padded_ids_are_never_allowed(backend: GrammarBackend, hf_tokenizer: Any) -> None:
    """Any 1-3 characters: exactly the ordinary tokens whose bytes can start such a string."""
    m = backend.compile("regex", "(.|\\n){1,3}").new_matcher()
    bm = backend.allocate_bitmask(1)
    m.fill_bitmask(bm, 0)
    byte_of = _byte_decoder()
    specials = set(hf_tokenizer.all_special_ids)
    assert specials == {0, 1, 2, 3, 4}
    expected = set()
    for t in range(TOK_VOCAB):
        if t in specials:
            continue
        chars = _utf8_prefix_chars(bytes(byte_of[c] for c in hf_tokenizer.convert_ids_to_tokens(t)))
        if chars is not None and 1 <= chars <= 3:
            expected.add(t)
    assert len(expected) > 200
    # No special token (<s>, <pad>, <|im_start|> read as literal text), no id past the tokenizer.
    assert _allowed(bm) == expected


def test_json_schema_and_ebnf_masks(backend: GrammarBackend, hf_tokenizer: Any) -> None:
    texts = _texts(hf_tokenizer)
    bm = backend.allocate_bitmask(1)
    m = backend.compile("json_schema", '{"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}')
    matcher = m.new_matcher()
    matcher.fill_bitmask(bm, 0)
    # Compact JSON: the only way to start is "{" (a token that is a prefix of '{"a": ').
    assert _allowed(bm) == {t for t, s in texts.items() if s and '{"a": '.startswith(s)}
    g = backend.compile("ebnf", 'root ::= "ab" | "ac"').new_matcher()
    g.fill_bitmask(bm, 0)
    assert _allowed(bm) == {t for t, s in texts.items() if s and ("ab".startswith(s) or "ac".startswith(s))}


@pytest.mark.parametrize(
    ("kind", "spec", "words"),
    [
        ("regex", "[abc", ["regex: invalid regular expression", "Unclosed '['"]),
        ("json_schema", "{not json", ["json_schema: invalid JSON schema", "not valid JSON"]),
        ("json_schema", '{"type": "nope"}', ["json_schema: invalid JSON schema", 'Unsupported type "nope"']),
        ("json_schema", "[1, 2]", ["json_schema: invalid JSON schema", "a schema is a JSON object"]),
        ("ebnf", "root ::= foo", ["ebnf: invalid EBNF grammar", 'Rule "foo" is not defined']),
        ("ebnf", 'start ::= "a"', ["ebnf: invalid EBNF grammar", "root"]),
    ],
)
def test_invalid_specs_name_the_parameter(backend: GrammarBackend, kind: str, spec: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        backend.compile(kind, spec)
    msg = str(info.value)
    assert msg.startswith(f"{kind}: ")
    for w in words:
        assert w in msg
    assert "/project/cpp" not in msg  # xgrammar's log prefix is stripped


def test_cache_compiles_once_per_key_from_any_thread(backend: GrammarBackend) -> None:
    built: list[str] = []

    def factory() -> GrammarBackend:
        built.append(threading.current_thread().name)
        return backend

    cache = GrammarCache(factory)
    assert cache.backend is None  # nothing built before the first grammar
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("regex", "[a-z]{1,4}"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert (cache.misses, cache.hits, len(built)) == (1, 3, 1)
    other = cache.get("ebnf", 'root ::= "x"')
    assert other is not results[0] and cache.get("ebnf", 'root ::= "x"') is other
    assert cache.get("regex", "[a-z]{1,4}") is results[0]
    assert (cache.misses, cache.hits, len(cache)) == (2, 5, 2)


def test_cache_does_not_keep_failures_and_evicts_lru(backend: GrammarBackend) -> None:
    cache = GrammarCache(lambda: backend, max_entries=2)
    for _ in range(2):
        with pytest.raises(ValueError, match="^regex: invalid regular expression"):
            cache.get("regex", "(")
    assert (cache.misses, len(cache)) == (2, 0)
    a = cache.get("regex", "a")
    cache.get("regex", "b")
    cache.get("regex", "c")  # evicts "a"
    assert len(cache) == 2 and cache.get("regex", "a") is not a
    with pytest.raises(ValueError, match="unknown grammar kind 'lark'"):
        cache.get("lark", "x")


def test_missing_backend_library_is_a_clear_value_error() -> None:
    register_grammar_backend("missing_lib", "sglang_no_such_grammar_module:Backend")
    with pytest.raises(GrammarBackendUnavailable) as info:
        create_grammar_backend("missing_lib", tokenizer=None, vocab_size=8, stop_token_ids=[0])
    assert "cannot be imported" in str(info.value) and "sglang_no_such_grammar_module" in str(info.value)
    cache = GrammarCache(lambda: create_grammar_backend("missing_lib", tokenizer=None, vocab_size=8, stop_token_ids=[0]))
    with pytest.raises(ValueError, match="^json_schema: structured output needs the 'missing_lib' grammar backend"):
        cache.get("json_schema", "{}")


def test_xgrammar_install_hint() -> None:
    from sglang.engine.constrained.registry import INSTALL_HINTS

    assert INSTALL_HINTS["xgrammar"] == "pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2"


def test_batched_fill_and_apply_touch_only_grammar_rows(backend: GrammarBackend, hf_tokenizer: Any) -> None:
    texts = _texts(hf_tokenizer)
    digits = backend.compile("regex", "[0-9]").new_matcher()
    ab = backend.compile("ebnf", 'root ::= "ab"').new_matcher()
    filler = BitmaskFiller("cpu")
    mask = filler.fill([None, digits, None, ab])
    assert mask is not None and mask.rows == [1, 3] and mask.bitmask.shape[0] == 4
    logits = torch.zeros(4, MODEL_VOCAB)
    filler.apply(logits, mask)
    finite = [set(torch.isfinite(logits[r]).nonzero().flatten().tolist()) for r in range(4)]
    assert finite[0] == finite[2] == set(range(MODEL_VOCAB))
    assert finite[1] == {t for t, s in texts.items() if re.fullmatch("[0-9]", s)}
    assert finite[3] == {t for t, s in texts.items() if s and "ab".startswith(s)}
    assert filler.fill([None, None]) is None
    # The buffer is reused across steps (no allocation per step) and grows when needed.
    again = filler.fill([digits])
    assert again is not None and again.bitmask.data_ptr() == mask.bitmask.data_ptr()
    big = filler.fill([digits] * 20)
    assert big is not None and big.bitmask.shape[0] == 20


def test_json_strings_never_hold_raw_control_characters(backend: GrammarBackend, hf_tokenizer: Any) -> None:
    """xgrammar 0.2.8 allows a tab inside a maxLength string; the backend masks such tokens out."""
    texts = _texts(hf_tokenizer)
    schema = '{"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}}, "required": ["s"]}'
    m = backend.compile("json_schema", schema).new_matcher()
    for tok in hf_tokenizer.encode('{"s": "', add_special_tokens=False):
        assert m.accept_token(tok)
    control = {t for t, s in texts.items() if any(ord(c) < 0x20 for c in s)}
    assert {t for t, s in texts.items() if s == "\t"} <= control and len(control) >= 30
    single = backend.allocate_bitmask(1)
    m.fill_bitmask(single, 0)
    batched = backend.allocate_bitmask(3)
    backend.fill_bitmask([m], batched, [2])
    assert torch.equal(single[0], batched[2])
    allowed = _allowed(single)
    assert not allowed & control
    assert {t for t, s in texts.items() if s in ("a", "é", '"')} <= allowed  # text and the closing quote


def test_adaptive_fill_uses_the_pool_only_when_rows_are_slow(backend: GrammarBackend) -> None:
    from sglang.engine.constrained.xgrammar_backend import AdaptiveFill

    ms = [backend.compile("regex", "[0-9]{2}|[a-z]+").new_matcher() for _ in range(6)]
    handles = [m._m for m in ms]  # type: ignore[attr-defined]
    rows = [5, 4, 3, 2, 1, 0]
    fill = AdaptiveFill(threads=2)
    serial = backend.allocate_bitmask(6)
    for _ in range(3):
        fill(handles, serial, rows)
    assert fill.row_cost_s > 0 and fill._pooled == 0  # microseconds a row: never worth the pool
    fill.PARALLEL_ABOVE_S = 0.0  # every batch now counts as slow
    pooled = backend.allocate_bitmask(6)
    for _ in range(fill.PROBE_EVERY):
        pooled.zero_()
        fill(handles, pooled, rows)
        assert torch.equal(pooled, serial)
    assert fill._pooled == fill.PROBE_EVERY  # the last of these was a serial probe


IP_REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"


@pytest.mark.parametrize(
    ("kind", "spec", "prefix"),
    [
        ("regex", IP_REGEX, "1"),
        ("regex", ".*", ""),
        ("regex", '[^"]*', ""),
        ("regex", r"\S+", ""),
        ("json_schema", '{"type": "string"}', '"'),
        ("json_schema", '{"type": "string", "maxLength": 5}', '"'),
        ("json_schema", '{"type": "string", "pattern": "^a.b$"}', '"a'),
        ("ebnf", 'root ::= [^"]*', ""),
        ("ebnf", r"root ::= [\0-\U0010ffff]+", ""),
    ],
)
def test_no_grammar_lets_a_utf16_surrogate_through(
    backend: GrammarBackend, hf_tokenizer: Any, kind: str, spec: str, prefix: str
) -> None:
    """After the lead byte ED, only 80..9F may follow (U+D000..U+D7FF); A0..BF would encode a
    surrogate (U+D800..U+DFFF), invalid UTF-8, which xgrammar 0.2.8 allowed for ``.``/``[^...]``."""
    from sglang.engine.constrained.xgrammar_backend import XGrammarBackend

    assert isinstance(backend, XGrammarBackend)
    vocab = backend.info.decoded_vocab
    lead = next(t for t, b in enumerate(vocab) if b == b"\xed")
    surrogate_tail = {t for t, b in enumerate(vocab) if b and 0xA0 <= b[0] <= 0xBF}
    valid_tail = {t for t, b in enumerate(vocab) if b and 0x80 <= b[0] <= 0x9F}
    assert len(surrogate_tail) >= 32 and len(valid_tail) >= 32
    m = backend.compile(kind, spec).new_matcher()
    for tok in hf_tokenizer.encode(prefix, add_special_tokens=False):
        assert m.accept_token(tok)
    assert m.accept_token(lead)
    bm = backend.allocate_bitmask(1)
    m.fill_bitmask(bm, 0)
    allowed = _allowed(bm)
    assert not allowed & surrogate_tail
    assert valid_tail <= allowed  # U+D000..U+D7FF stay allowed


def test_exclude_surrogates_rewrites_only_character_classes() -> None:
    from sglang.engine.constrained.surrogates import exclude_surrogates

    assert exclude_surrogates(r'root ::= (("[^a]" [^\"\]] [\0-\U0010ffff]))') == (
        r'root ::= (("[^a]" [^\"\]\ud800-\udfff] [\u0000-\ud7ff\ue000-\U0010ffff]))'
    )
    assert exclude_surrogates(r"r ::= [a-z\-\\] [\ud000-\ud900x] [\ude00-\ue000]") == (
        r"r ::= [a-z\-\\] [\ud000-\ud7ffx] [\ue000-\ue000]"
    )
    assert exclude_surrogates(r'r ::= "a\"[" [^]') == r'r ::= "a\"[" [^\ud800-\udfff]'
