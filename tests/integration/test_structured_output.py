"""Structured output through ``sglang.Engine``: regex, json_schema and ebnf on a tiny random Llama
whose tokenizer is a real vocabulary (Llama-3, 128,256 tokens + specials; ``make install`` fetches it).

- 200 generations at temperature 1.0 (batched): every json_schema output validates with
  ``jsonschema``, every regex output ``re.fullmatch``es, every ebnf output parses, and every one
  ends with finish_reason ``stop``;
- greedy under a grammar that allows the unconstrained tokens gives the unconstrained output;
- n > 1 (a matcher per sample), grammar rows beside unconstrained ones (which stay unchanged),
  stop strings and max_new_tokens, logprobs of the masked distribution, retraction;
- bad regex / schema / ebnf: ValueError naming the field, nothing submitted, other requests
  unaffected; grammars compile on the caller's thread, never the scheduler's.

Every test ends with ``check_integrity()`` and 0 pages in use.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sglang.engine.constrained import GrammarCache
from sglang.engine.constrained.base import CompiledGrammar
from sglang.engine.constrained.xgrammar_backend import XGrammarBackend
from sglang.engine.engine import Engine

from tests.helpers.real_vocab import copy_tokenizer_into
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration

MODEL_VOCAB = 128320  # the tokenizer has 128,257 ids; the logits are wider (ids past it are masked)
EOS = 128001  # <|end_of_text|>
ENGINE_KW: dict[str, Any] = {"device": "cpu", "dtype": "float32", "page_size": 16}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
TAGS = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["tags", "ok"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "point": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                           "y": {"type": "integer", "minimum": -50, "maximum": 50}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "note": {"type": ["string", "null"], "maxLength": 4},
    },
    "required": ["id", "point", "note"],
    "additionalProperties": False,
}
PHONE = r"[0-9]{3}-[0-9]{3}-[0-9]{4}"
ANSWER = r"(yes|no|maybe), [a-z]{2,6}!"
# Arithmetic with at most one level of parentheses and three terms at each level.
ARITH = """root ::= term (op term){0,2}
term ::= num | "(" num (op num){0,2} ")"
op ::= "+" | "-" | "*"
num ::= [0-9] | [1-9] [0-9]
"""


def parse_arith(s: str) -> bool:
    """Recursive descent over ARITH's language; True when ``s`` is a sentence of it."""
    pos = 0

    def num() -> bool:
        nonlocal pos
        m = re.match(r"[1-9][0-9]|[0-9]", s[pos:])
        if not m:
            return False
        pos += m.end()
        return True

    def op() -> bool:
        nonlocal pos
        if pos < len(s) and s[pos] in "+-*":
            pos += 1
            return True
        return False

    def seq(item: Any) -> bool:  # item (op item){0,2}
        nonlocal pos
        if not item():
            return False
        for _ in range(2):
            save = pos
            if not (op() and item()):
                pos = save
                break
        return True

    def term() -> bool:
        nonlocal pos
        if pos < len(s) and s[pos] == "(":
            pos += 1
            if not seq(num) or pos >= len(s) or s[pos] != ")":
                return False
            pos += 1
            return True
        return num()

    return seq(term) and pos == len(s)


def test_parse_arith_is_strict() -> None:
    assert all(parse_arith(s) for s in ["0", "12", "(1+2)*3", "(1)", "4-(5*6-7)+8", "99"])
    assert not any(parse_arith(s) for s in ["", "01", "1+", "((1))", "1+2+3+4", "(1+2+3+4)", "123", "(1"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny_model(
        "llama", tmp_path_factory.mktemp("llama3vocab"), vocab_size=MODEL_VOCAB, seed=0,
        eos_token_id=EOS, bos_token_id=128000, pad_token_id=EOS,
    )
    copy_tokenizer_into("llama-bpe", str(path))
    return path


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine(model_path=str(model_dir), max_total_tokens=32768, **ENGINE_KW)
    yield eng
    eng.shutdown()


def _no_leak(eng: Engine) -> None:
    deadline = time.time() + 10
    while eng.get_stats()["num_used_pages"] and time.time() < deadline:
        time.sleep(0.01)
    eng.check_integrity()
    assert eng.get_stats()["num_used_pages"] == 0


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engine" in request.fixturenames:
        _no_leak(request.getfixturevalue("engine"))


def _prompts(n: int, what: str) -> list[str]:
    return [f"Example {i} of {what}:" for i in range(n)]


def _all_stop(outs: list[dict[str, Any]]) -> None:
    reasons = [o["meta_info"]["finish_reason"] for o in outs]
    assert all(r["type"] == "stop" and r["matched"] == EOS for r in reasons), reasons


def test_json_schema_outputs_validate(engine: Engine) -> None:
    schemas = [PERSON, TAGS, POINT]
    params = [{"json_schema": json.dumps(s), "temperature": 1.0, "max_new_tokens": 128} for s in schemas for _ in range(24)]
    outs = engine.generate(_prompts(72, "JSON"), params)
    assert isinstance(outs, list) and len(outs) == 72
    _all_stop(outs)
    for i, o in enumerate(outs):
        jsonschema.validate(json.loads(o["text"]), schemas[i // 24])
    assert len({o["text"] for o in outs}) > 36  # temperature 1.0 explores the schema


def test_regex_outputs_fullmatch(engine: Engine) -> None:
    params = [{"regex": rx, "temperature": 1.0, "max_new_tokens": 48} for rx in (PHONE, ANSWER) for _ in range(40)]
    outs = engine.generate(_prompts(80, "text"), params)
    assert isinstance(outs, list) and len(outs) == 80
    _all_stop(outs)
    for i, o in enumerate(outs):
        assert re.fullmatch(PHONE if i < 40 else ANSWER, o["text"]), o["text"]
    assert len({o["text"] for o in outs}) > 40


def test_ebnf_outputs_parse(engine: Engine) -> None:
    outs = engine.generate(_prompts(48, "math"), {"ebnf": ARITH, "temperature": 1.0, "max_new_tokens": 48})
    assert isinstance(outs, list) and len(outs) == 48
    _all_stop(outs)
    for o in outs:
        assert parse_arith(o["text"]), o["text"]
    assert any("(" in o["text"] for o in outs) and len({o["text"] for o in outs}) > 24


def test_greedy_under_a_permissive_grammar_equals_unconstrained(engine: Engine) -> None:
    """Where the unconstrained greedy tokens are ordinary text, a grammar allowing any text picks them."""
    prompts = _prompts(8, "greedy")
    base = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    free = engine.generate(prompts, base)
    constrained = engine.generate(prompts, {**base, "regex": "(.|\\n)*"})
    assert isinstance(free, list) and isinstance(constrained, list)
    specials = set(engine.tokenizer.all_special_ids) if engine.tokenizer else set()
    ordinary = [
        i for i, o in enumerate(free)
        if not set(o["output_ids"]) & (specials | {EOS}) and max(o["output_ids"]) < 128256 and "\ufffd" not in o["text"]
    ]
    assert len(ordinary) >= 3
    for i in ordinary:
        assert constrained[i]["output_ids"] == free[i]["output_ids"]
        assert constrained[i]["text"] == free[i]["text"]


def test_n_samples_have_their_own_matchers(engine: Engine) -> None:
    outs = engine.generate("Phone:", {"regex": PHONE, "n": 6, "temperature": 1.0, "max_new_tokens": 32, "seed": 5})
    assert isinstance(outs, list) and len(outs) == 6
    _all_stop(outs)
    assert all(re.fullmatch(PHONE, o["text"]) for o in outs)
    assert len({o["text"] for o in outs}) >= 4


def test_grammar_rows_beside_unconstrained_rows(engine: Engine) -> None:
    free = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    alone = engine.generate(["Plain one", "Plain two"], free)
    mixed = engine.generate(
        ["Plain one", "Tags:", "Plain two", "Answer:"],
        [free, {"json_schema": json.dumps(TAGS), "temperature": 1.0, "max_new_tokens": 64}, free,
         {"regex": ANSWER, "temperature": 0, "max_new_tokens": 32}],
    )
    assert isinstance(alone, list) and isinstance(mixed, list)
    assert [mixed[0]["output_ids"], mixed[2]["output_ids"]] == [alone[0]["output_ids"], alone[1]["output_ids"]]
    assert mixed[0]["meta_info"]["finish_reason"]["type"] == "length"
    jsonschema.validate(json.loads(mixed[1]["text"]), TAGS)
    assert re.fullmatch(ANSWER, mixed[3]["text"])


def test_stop_strings_and_max_new_tokens_end_a_grammar_early(engine: Engine) -> None:
    out = engine.generate("Code:", {"regex": "[a-z]{3}-[0-9]{3}", "stop": ["-"], "temperature": 1.0, "seed": 1})
    assert isinstance(out, dict)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "-"}
    assert re.fullmatch("[a-z]{3}", out["text"]), out["text"]
    out = engine.generate("Person:", {"json_schema": json.dumps(PERSON), "max_new_tokens": 3, "temperature": 1.0})
    assert isinstance(out, dict)
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["completion_tokens"] == 3 and out["text"].startswith('{"')
    # ignore_eos does not outlive the grammar: it ends at the stop token the grammar requires.
    out = engine.generate("Digit:", {"regex": "[0-9]", "ignore_eos": True, "max_new_tokens": 20, "temperature": 0})
    assert isinstance(out, dict)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert re.fullmatch("[0-9]", out["text"]) and out["output_ids"][-1] == EOS


def test_logprobs_are_of_the_masked_distribution(engine: Engine) -> None:
    out = engine.generate(
        "Digit:", {"regex": "[0-9]", "temperature": 0, "max_new_tokens": 4}, return_logprob=True, top_logprobs_num=12,
    )
    assert isinstance(out, dict)
    meta = out["meta_info"]
    assert len(out["output_ids"]) == 2 and out["output_ids"][1] == EOS
    tok = engine.tokenizer
    assert tok is not None
    top = meta["output_top_logprobs"][0]
    finite = [(lp, t) for lp, t, _ in top if math.isfinite(lp)]
    assert sorted(tok.decode([t]) for _, t in finite) == [str(d) for d in range(10)]
    assert math.isclose(sum(math.exp(lp) for lp, _ in finite), 1.0, rel_tol=1e-4)
    lp, tid, _ = meta["output_token_logprobs"][0]
    assert tid == out["output_ids"][0] == top[0][1] and math.isclose(lp, top[0][0], abs_tol=1e-5)
    # After the digit only EOS is allowed: probability 1.
    assert meta["output_token_logprobs"][1] == (0.0, EOS, None)


def test_bad_grammars_are_refused_and_others_unaffected(engine: Engine) -> None:
    free = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    expected = engine.generate("Background", free)
    result: dict[str, Any] = {}
    bg = threading.Thread(target=lambda: result.update(out=engine.generate("Background", free)))
    bg.start()
    bad = [
        ("regex", "[0-9", "Unclosed '['"),
        ("json_schema", '{"type": "object", "properties": {"a": {"type": "nope"}}}', 'Unsupported type "nope"'),
        ("json_schema", "{not json", "not valid JSON"),
        ("ebnf", "root ::= missing", 'Rule "missing" is not defined'),
    ]
    steps = engine.get_stats()["num_steps"]
    for field, spec, detail in bad:
        with pytest.raises(ValueError) as info:
            engine.generate(["Fine", "Bad"], [{"max_new_tokens": 4}, {field: spec, "max_new_tokens": 4}])
        assert str(info.value).startswith(f"{field}: invalid ") and detail in str(info.value)
        with pytest.raises(ValueError, match=f"^{field}: "):
            asyncio.run(engine.async_generate("Bad", {field: spec}))
    bg.join(timeout=60)
    assert result["out"]["output_ids"] == expected["output_ids"]  # type: ignore[index]
    assert engine.get_stats()["num_steps"] - steps <= 41  # only the background request ran
    ok = engine.generate("Again", {"regex": PHONE, "max_new_tokens": 32})
    assert isinstance(ok, dict) and re.fullmatch(PHONE, ok["text"])


def test_grammars_compile_off_the_scheduler_thread_and_once(engine: Engine) -> None:
    seen: list[str] = []
    backend = engine.grammars.backend
    assert backend is not None

    class Recording(XGrammarBackend):
        def compile(self, kind: str, spec: str) -> CompiledGrammar:
            seen.append(threading.current_thread().name)
            return super().compile(kind, spec)

    rec = Recording.__new__(Recording)
    rec.__dict__.update(backend.__dict__)  # the same tokenizer info and compiler, recorded
    old = engine.grammars
    engine.grammars = GrammarCache(lambda: rec)
    try:
        engine.generate("A", {"regex": "[a-c]{2}", "max_new_tokens": 8})
        asyncio.run(engine.async_generate("B", {"regex": "[d-f]{2}", "max_new_tokens": 8}))
        engine.generate(["C", "D"], {"regex": "[a-c]{2}", "max_new_tokens": 8})  # cached: no compile
    finally:
        engine.grammars = old
    assert len(seen) == 2
    assert seen[0] == threading.main_thread().name
    assert seen[1] not in ("sglang-scheduler", threading.main_thread().name)  # a worker thread
    assert engine.grammars.get("regex", PHONE) is engine.grammars.get("regex", PHONE)


def test_no_tokenizer_means_a_clear_error(model_dir: Path) -> None:
    eng = Engine(model_path=str(model_dir), skip_tokenizer_init=True, max_total_tokens=1024, **ENGINE_KW)
    try:
        with pytest.raises(ValueError, match="^regex: structured output needs the model's tokenizer"):
            eng.generate(input_ids=[1, 2, 3], sampling_params={"regex": "a"})
        out = eng.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
        assert isinstance(out, dict) and len(out["output_ids"]) == 2
        _no_leak(eng)
    finally:
        eng.shutdown()


def test_retracted_requests_keep_their_grammar_state(model_dir: Path) -> None:
    """16 pages for 12 requests that need about 2 pages each: decode retracts and recomputes."""
    eng = Engine(model_path=str(model_dir), max_total_tokens=256, new_token_ratio=0.0, **ENGINE_KW)
    try:
        params = {"json_schema": json.dumps(TAGS), "temperature": 1.0, "max_new_tokens": 64, "seed": 3}
        outs = eng.generate([f"Request {i} asks for tags:" for i in range(12)], params)
        assert isinstance(outs, list)
        assert eng.get_stats()["num_retractions"] > 0
        _all_stop(outs)
        for o in outs:
            jsonschema.validate(json.loads(o["text"]), TAGS)
        _no_leak(eng)
    finally:
        eng.shutdown()


def test_grammar_requests_beside_overlapped_decode_steps(model_dir: Path, engine: Engine) -> None:
    """With overlap scheduling forced on, steps with a grammar row run synchronously and plain
    decode steps overlap; the outputs equal the synchronous engine's."""
    prompts = ["Plain one", "Digit:", "Plain two", "Answer:"]
    params = [
        {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
        {"regex": "[0-9]", "temperature": 0, "max_new_tokens": 8},
        {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
        {"regex": ANSWER, "temperature": 0, "max_new_tokens": 32},
    ]
    ref = engine.generate(prompts, params)
    eng = Engine(model_path=str(model_dir), max_total_tokens=4096, overlap_schedule="on", **ENGINE_KW)
    try:
        got = eng.generate(prompts, params)
        assert isinstance(ref, list) and isinstance(got, list)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in ref]
        assert re.fullmatch("[0-9]", got[1]["text"]) and re.fullmatch(ANSWER, got[3]["text"])
        assert eng.scheduler.num_overlapped_steps > 0
        _no_leak(eng)
    finally:
        eng.shutdown()


IP_REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"


def test_regex_dot_never_emits_a_utf16_surrogate(tmp_path: Path) -> None:
    """xgrammar 0.2.8's ``.`` allowed ED A0..BF xx (a surrogate, invalid UTF-8): on a byte-level
    tokenizer the text got U+FFFD and failed ``re.fullmatch``. 200 samples at temperature 1.0."""
    from tests.helpers.tokenizers import make_tiny_tokenizer

    make_tiny_model("llama", tmp_path, vocab_size=320, seed=0, eos_token_id=1, bos_token_id=0, pad_token_id=2)
    make_tiny_tokenizer(str(tmp_path), vocab_size=320)
    eng = Engine(model_path=str(tmp_path), max_total_tokens=16384, **ENGINE_KW)
    try:
        params = {"regex": IP_REGEX, "temperature": 1.0, "max_new_tokens": 32}
        outs = eng.generate([f"IP {i}:" for i in range(200)], params)
        assert isinstance(outs, list) and len(outs) == 200
        for o in outs:
            assert "\ufffd" not in o["text"] and re.fullmatch(IP_REGEX, o["text"], re.DOTALL), (o["text"], o["output_ids"])
        _no_leak(eng)
    finally:
        eng.shutdown()
