"""Per-request sampling parameters, named and defaulted as SGLang names them.

A ``SamplingParams`` is plain data. The request path is::

    params = SamplingParams.from_dict(user_dict)   # unknown keys rejected
    params.normalize()                             # stop: str -> [str]; logit_bias keys -> int
    params.verify(vocab_size)                      # bounds and types; ValueError names the field

Every ``ValueError`` raised here names the offending parameter and says what a valid value looks
like, so the HTTP layer can return it verbatim as a 400.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this are treated as greedy (as SGLang does): dividing logits by a tiny
# temperature would overflow to inf and turn the softmax into NaN.
GREEDY_TEMPERATURE_EPS = 1e-6

_GRAMMAR_FIELDS = ("regex", "json_schema", "ebnf")


@dataclass
class SamplingParams:
    """Sampling parameters of one request (SGLang's names and defaults).

    ``temperature == 0`` (or ``top_k == 1``) means greedy decoding. ``top_k == -1`` turns top-k
    off. ``stop`` are stop strings (matched on detokenized text by the caller), ``stop_token_ids``
    extra token ids that end generation like EOS does. ``logit_bias`` maps token id (int, or its
    decimal string as JSON delivers it) to an additive bias. ``seed`` makes sampling reproducible:
    the caller owns one ``torch.Generator`` per seeded request.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1
    seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    logit_bias: dict[str | int, float] | None = field(default=None)
    no_stop_trim: bool = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all parameters, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a user dict; ``None`` gives the defaults.

        Raises ``ValueError`` on a key that is not a sampling parameter (no aliases: ``max_tokens``
        is the OpenAI name and must be mapped by the OpenAI layer). Values are not checked here;
        call ``normalize()`` and ``verify()``.
        """
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be a JSON object (dict), got {type(d).__name__}")
        known = cls.field_names()
        for key in d:
            if key not in known:
                raise ValueError(f"unknown sampling parameter {key!r}; known: {', '.join(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """All parameters as a plain dict; ``from_dict(p.to_dict()) == p``."""
        return dataclasses.asdict(self)

    def normalize(self) -> SamplingParams:
        """Canonicalize in place and return self: ``stop`` str -> [str], ``logit_bias`` keys -> int.

        Raises ``ValueError`` (naming ``logit_bias``) on a key that is not an integer.
        """
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.logit_bias is not None and isinstance(self.logit_bias, dict):
            converted: dict[str | int, float] = {}
            for key, value in self.logit_bias.items():
                converted[_token_key(key)] = value
            self.logit_bias = converted
        return self

    # ------------------------------------------------------------------ validation

    def verify(self, vocab_size: int) -> None:
        """Check types and bounds; raise ``ValueError`` naming the parameter and the valid range."""
        self._verify_types()
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0 turns it off), got {value}")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}"
            )
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for tok in self.stop_token_ids or []:
            if not 0 <= tok < vocab_size:
                raise ValueError(f"stop_token_ids must lie in [0, vocab_size={vocab_size}), got {tok}")
        for key in self.logit_bias or {}:
            tok = _token_key(key)
            if not 0 <= tok < vocab_size:
                raise ValueError(f"logit_bias keys must lie in [0, vocab_size={vocab_size}), got {key!r}")
        grammars = [name for name in _GRAMMAR_FIELDS if getattr(self, name) is not None]
        if len(grammars) > 1:
            raise ValueError(
                f"at most one of regex, json_schema, ebnf may be set, got {' and '.join(grammars)}"
            )

    def _verify_types(self) -> None:
        for name in ("max_new_tokens", "top_k", "min_new_tokens", "n"):
            _check_int(name, getattr(self, name))
        if self.seed is not None:
            _check_int("seed", self.seed)
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
        ):
            _check_number(name, getattr(self, name))
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in _GRAMMAR_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or null, got {type(value).__name__}")
        stop_ok = self.stop is None or isinstance(self.stop, str)
        stop_ok = stop_ok or (isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop))
        if not stop_ok:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list):
                raise ValueError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
            for tok in self.stop_token_ids:
                _check_int("stop_token_ids", tok)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be an object of token id -> bias, got {self.logit_bias!r}")
            for key, value in self.logit_bias.items():
                _token_key(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                    raise ValueError(f"logit_bias values must be numbers, got {value!r} for key {key!r}")

    # ------------------------------------------------------------------ derived

    @property
    def is_greedy(self) -> bool:
        """True for greedy decoding: temperature 0 (below 1e-6) or top_k == 1."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _token_key(key: object) -> int:
    """A logit_bias key as int: ints pass, decimal strings (JSON object keys) are parsed."""
    if isinstance(key, bool):
        raise ValueError(f"logit_bias keys must be token ids (integers), got {key!r}")
    if isinstance(key, int):
        return key
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            pass
    raise ValueError(f"logit_bias keys must be token ids (integers), got {key!r}")
