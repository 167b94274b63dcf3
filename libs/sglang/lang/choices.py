"""``select`` / ``gen(choices=...)``: token-length-normalized prompt logprobs (SGLang's method).

Each choice is scored as the continuation of the prefix: the mean logprob of the tokens that make up
the choice in ``prefix + choice``, read from prompt logprobs of one batched request with no new
tokens. The winner is the argmax (ties: the first choice). Where a tokenizer merges the end of the
prefix with the start of the choice (``"a " + "b"`` -> ``" b"``), the merged token counts as the
choice's: the choice's tokens are found by walking the token texts back from the end until they
cover the choice's characters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LogprobEntry = Sequence[Any]
"""SGLang's tuple ``[logprob, token_id, token_text_or_None]``."""


@dataclass
class ChoiceDecision:
    """Outcome of a select: the chosen text and every choice's normalized logprob."""

    choice: str
    index: int
    normalized_logprobs: list[float]
    meta_info: dict[str, Any] = field(default_factory=dict)


def choice_logprobs(choice: str, entries: Sequence[LogprobEntry], fallback_tokens: int) -> list[float]:
    """Logprobs of the tokens covering ``choice`` at the end of the scored text.

    ``entries`` are the prompt logprobs from some position before the choice to the end. With token
    texts, the tokens are taken from the end until their texts cover ``len(choice)`` characters;
    without (or when texts do not add up), the last ``fallback_tokens`` entries.
    """
    scored = [e for e in entries if e[0] is not None]
    if not scored:
        raise ValueError(f"the backend returned no prompt logprobs for choice {choice!r}")
    if all(isinstance(e[2], str) for e in scored):
        covered = 0
        for k, e in enumerate(reversed(scored), start=1):
            covered += len(e[2])
            if covered >= len(choice):
                return [float(x[0]) for x in scored[-k:]]
    k = max(1, min(fallback_tokens, len(scored)))
    return [float(x[0]) for x in scored[-k:]]


def decide(choices: Sequence[str], per_choice: Sequence[Sequence[float]], temperature: float = 0.0,
           meta_info: dict[str, Any] | None = None) -> ChoiceDecision:
    """Argmax of the mean logprobs (``temperature`` 0), or a sample from their softmax at
    ``temperature`` > 0."""
    norm = [sum(lps) / len(lps) for lps in per_choice]
    if temperature > 0:
        top = max(norm)
        weights = [math.exp((v - top) / temperature) for v in norm]
        index = random.choices(range(len(norm)), weights=weights)[0]
    else:
        index = max(range(len(norm)), key=lambda i: (norm[i], -i))
    meta = dict(meta_info or {})
    meta["normalized_prompt_logprobs"] = norm
    return ChoiceDecision(choices[index], index, norm, meta)


def check_choices(choices: Any) -> list[str]:
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise TypeError(f"choices must be a list of strings, got {type(choices).__name__}")
    out = list(choices)
    if not out:
        raise ValueError("select needs at least one choice; choices is empty")
    for c in out:
        if not isinstance(c, str) or not c:
            raise ValueError(f"every choice must be a non-empty string, got {c!r}")
    return out
