"""Keep UTF-16 surrogates (U+D800..U+DFFF) out of xgrammar's character classes.

xgrammar 0.2.8 matches a character class over every code point up to U+10FFFF, surrogates
included, and encodes each as UTF-8 bytes: a regex ``.``, a negated class such as ``[^"]`` or
``\\S``, a JSON-schema string, an EBNF ``[^...]`` all accept ``ED A0 80``..``ED BF BF``, which is not
valid UTF-8, so the detokenized text holds U+FFFD and no longer matches. A token mask cannot fix
it (the lead byte ``ED`` and the continuation byte may come from different tokens): the grammar
itself must forbid them.

``exclude_surrogates`` rewrites the EBNF text xgrammar prints for any grammar (regex and JSON
schema included, through ``xgr.Grammar.from_regex`` / ``from_json_schema``): a negated class gets
``\\ud800-\\udfff`` added to what it excludes, a positive range that spans surrogates is split around
them. String literals are left as written (a literal surrogate escape is the user's explicit
choice). xgrammar keeps some regexes (a JSON-schema ``pattern`` holding ``.``) as a
``Regex("...", json_string=true)`` macro expanded at compile time: inside one, a ``.`` becomes a
class without surrogates (for a JSON string, also without ``"``, ``\\`` and control characters, so
the text stays valid JSON) and a negated class gets the surrogates added.
"""

from __future__ import annotations

SURROGATE_LO = 0xD800
SURROGATE_HI = 0xDFFF

_NAMED = {"0": 0, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, "a": 7, "b": 8, "e": 27}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


def _escape(cp: int) -> str:
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def _char(text: str, i: int) -> tuple[int, int]:
    """The code point of the (possibly escaped) class character at ``text[i]`` and the next index."""
    if text[i] != "\\":
        return ord(text[i]), i + 1
    kind = text[i + 1]
    if kind in _HEX_DIGITS:
        n = _HEX_DIGITS[kind]
        digits = text[i + 2 : i + 2 + n]
        if len(digits) == n and all(c in "0123456789abcdefABCDEF" for c in digits):
            return int(digits, 16), i + 2 + n
    if kind in _NAMED:
        return _NAMED[kind], i + 2
    return ord(kind), i + 2


def _class(text: str, start: int) -> tuple[str, int]:
    """Rewrite the class opening at ``text[start] == '['``; returns the new text and the index after ``]``."""
    i = start + 1
    negated = i < len(text) and text[i] == "^"
    if negated:
        i += 1
    body_start = i
    pieces: list[str] = []
    while i < len(text) and text[i] != "]":
        lo, j = _char(text, i)
        hi = lo
        if j + 1 < len(text) and text[j] == "-" and text[j + 1] != "]":
            hi, j = _char(text, j + 1)
        raw = text[i:j]
        if not negated and lo <= SURROGATE_HI and hi >= SURROGATE_LO:
            split = []
            if lo < SURROGATE_LO:
                split.append(f"{_escape(lo)}-{_escape(SURROGATE_LO - 1)}")
            if hi > SURROGATE_HI:
                split.append(f"{_escape(SURROGATE_HI + 1)}-{_escape(hi)}")
            raw = "".join(split)
        pieces.append(raw)
        i = j
    if i >= len(text):
        raise ValueError("unterminated character class")
    body = "".join(pieces)
    if negated:
        return f"[^{text[body_start:i]}{_escape(SURROGATE_LO)}-{_escape(SURROGATE_HI)}]", i + 1
    if not body:
        # Only surrogates were allowed: a class that matches nothing is not expressible, keep it.
        return text[start : i + 1], i + 1
    return f"[{body}]", i + 1


def _literal(text: str, start: int) -> tuple[str, int]:
    """The decoded string literal opening at ``text[start] == '"'`` and the index after it."""
    out: list[str] = []
    i = start + 1
    while i < len(text) and text[i] != '"':
        cp, i = _char(text, i)
        out.append(chr(cp))
    return "".join(out), i + 1


def _quote(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(_escape(ord(ch)))
    return '"' + "".join(out) + '"'


def _regex(rx: str, json_string: bool) -> str:
    """``rx`` with ``.`` and negated classes excluding surrogates (a scan, not a regex engine)."""
    dot = r'[^"\\\x00-\x1f\uD800-\uDFFF]' if json_string else r"[^\uD800-\uDFFF]"
    out: list[str] = []
    i = 0
    in_class = negated = False
    while i < len(rx):
        c = rx[i]
        if c == "\\":
            out.append(rx[i : i + 2])
            i += 2
            continue
        if in_class:
            if c == "]" and not (out and out[-1] in ("[", "[^")):
                out.append(r"\uD800-\uDFFF]" if negated else "]")
                in_class = False
            else:
                out.append(c)
            i += 1
        elif c == "[":
            in_class = True
            negated = rx[i + 1 : i + 2] == "^"
            out.append("[^" if negated else "[")
            i += 2 if negated else 1
        else:
            out.append(dot if c == "." else c)
            i += 1
    return "".join(out)


def exclude_surrogates(ebnf: str) -> str:
    """``ebnf`` (as xgrammar prints it) with no character class matching a surrogate code point."""
    out: list[str] = []
    i = 0
    n = len(ebnf)
    while i < n:
        c = ebnf[i]
        if ebnf.startswith('Regex("', i):
            rx, j = _literal(ebnf, i + 6)
            close = ebnf.find(")", j)
            json_string = "json_string=true" in ebnf[j:close]
            out.append("Regex(" + _quote(_regex(rx, json_string)))
            i = j
        elif c == '"':  # a string literal, copied verbatim
            j = i + 1
            while j < n and ebnf[j] != '"':
                j += 2 if ebnf[j] == "\\" else 1
            out.append(ebnf[i : j + 1])
            i = j + 1
        elif c == "[":
            cls, i = _class(ebnf, i)
            out.append(cls)
        else:
            out.append(c)
            i += 1
    return "".join(out)
