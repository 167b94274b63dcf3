"""The interface every frontend backend implements, and what the interpreter hands it.

A backend turns one ``gen`` into text, scores the choices of one ``select``, and knows how the
model writes chat roles. Calls come from the executor threads of many program states at once, so a
backend must be safe to call from several threads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sglang.lang.choices import ChoiceDecision
from sglang.lang.ir import GenParams

META_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason")


@dataclass
class GenInput:
    """A program state at the point of a ``gen``/``select``."""

    text: str  # everything so far, roles rendered with the model's chat template
    messages: list[dict[str, Any]] = field(default_factory=list)  # finished role turns
    role: str | None = None  # the role whose turn is open, if any
    role_text: str = ""  # what the open turn holds so far


class Backend(ABC):
    """``generate`` / ``generate_stream`` / ``select`` for the interpreter (thread-safe)."""

    model_name: str = ""

    def chat_roles(self) -> dict[str, Any] | None:
        """``{role: [begin, end], "stop_token_ids": [...]}`` (see ``chat_role_markers``), or None
        when the model has no chat template."""
        return None

    def supports_images(self) -> bool:
        return False

    @abstractmethod
    def generate(self, inp: GenInput, params: GenParams) -> tuple[str, dict[str, Any]]:
        """(generated text, meta_info with at least :data:`META_KEYS`)."""

    def generate_stream(self, inp: GenInput, params: GenParams) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """(new text, None) pieces, then ("", meta_info). The default does not stream."""
        text, meta = self.generate(inp, params)
        yield text, None
        yield "", meta

    @abstractmethod
    def select(self, inp: GenInput, choices: list[str], temperature: float) -> ChoiceDecision:
        """Pick one of ``choices`` as the continuation of ``inp``."""

    def cache_prefix(self, text: str) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Make ``text`` a cached prefix before several forks continue it (optional)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release what the backend holds."""


def snapshot_deltas(snapshots: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """Cumulative ``{text, meta_info}`` snapshots (SGLang's streaming shape) as ``generate_stream``
    pieces: the new text of each, then ``("", last meta_info)``."""
    sent = 0
    meta: dict[str, Any] = {}
    for snap in snapshots:
        text = snap["text"]
        if len(text) > sent:
            yield text[sent:], None
            sent = len(text)
        meta = snap["meta_info"]
    yield "", meta_of(meta)


def meta_of(meta: dict[str, Any]) -> dict[str, Any]:
    """SGLang's ``meta_info`` with the common keys always present."""
    out = dict(meta)
    for k in META_KEYS:
        out.setdefault(k, None)
    return out


def choice_start(prefix_tokens: int) -> int:
    """``logprob_start_len`` for scoring choices after a prefix of ``prefix_tokens`` tokens: one
    prefix token early, so a token that merges the prefix's end with the choice is still scored."""
    return max(prefix_tokens - 1, 0)


def select_meta(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """meta_info of a select scored by prompt logprobs: sums over the scoring requests (one per
    choice), and each one's own ``meta_info`` under ``choices_meta_info``."""
    metas = [o["meta_info"] for o in outs]
    return {
        "prompt_tokens": sum(m["prompt_tokens"] for m in metas),
        "completion_tokens": 0,
        "cached_tokens": sum(m.get("cached_tokens") or 0 for m in metas),
        "finish_reason": None,
        "choices_meta_info": metas,
    }
