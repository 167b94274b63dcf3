"""One sample's output: worker events -> client updates (incremental text, stop strings).

The worker sends token ids; :class:`SampleDecoder` turns each of its events into a
:class:`SampleUpdate` with the text that became visible: detokenized incrementally (a character cut
in the middle of its bytes is held back) and checked against the stop strings (text that may be the
start of a stop string is held back; a match trims the text and ends the sample, even if the worker
has not stopped yet). :class:`SampleResult` accumulates updates for non-streaming answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sglang.engine.sampling.params import SamplingParams
from sglang.engine.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer
from sglang.transport.types import GenerateEvent, LogprobEntry


@dataclass
class SampleUpdate:
    """New output of one sample. ``finish_reason`` is set on its last update only."""

    index: int
    text: str = ""  # new visible text (stop strings trimmed, partial characters held back)
    token_ids: list[int] = field(default_factory=list)  # new output tokens
    logprobs: list[LogprobEntry] = field(default_factory=list)  # for token_ids, when asked
    input_logprobs: list[LogprobEntry] = field(default_factory=list)  # on the last update, when asked
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str = ""


@dataclass
class SampleResult:
    """Everything one sample produced (what a non-streaming response reports)."""

    index: int
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    input_logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str = ""

    def add(self, u: SampleUpdate) -> None:
        self.text += u.text
        self.output_ids += u.token_ids
        self.logprobs += u.logprobs
        self.input_logprobs += u.input_logprobs
        self.finish_reason = u.finish_reason or self.finish_reason
        self.prompt_tokens = u.prompt_tokens or self.prompt_tokens
        self.completion_tokens = u.completion_tokens or self.completion_tokens
        self.cached_tokens = u.cached_tokens or self.cached_tokens
        self.worker_id = u.worker_id or self.worker_id


async def collect(updates: AsyncIterator[SampleUpdate], num_samples: int) -> list[SampleResult]:
    results = [SampleResult(i) for i in range(num_samples)]
    async for u in updates:
        results[u.index].add(u)
    return results


class SampleDecoder:
    """Decodes one sample's worker events. ``feed`` returns the update for one event; the update has
    ``finish_reason`` set when the sample is over (worker ``complete``, or a stop string matched here)."""

    def __init__(self, tokenizer: Tokenizer, index: int, input_ids: Sequence[int], params: SamplingParams) -> None:
        self.index = index
        self.num_prompt_tokens = len(input_ids)
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_ids=input_ids, skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        self.stop = StopChecker(params.stop, no_stop_trim=params.no_stop_trim)
        self.sent = 0  # characters of visible text already in updates (with stop strings)
        self.num_tokens = 0  # output tokens received

    def feed(self, ev: GenerateEvent, worker_id: str) -> SampleUpdate:
        """``ev`` is a ``chunk`` or ``complete`` event (errors are the caller's)."""
        self.num_tokens += len(ev.token_ids)
        final = ev.kind == "complete"
        delta = self.detok.add(ev.token_ids)
        if final:
            delta += self.detok.flush()
        matched = False
        if self.stop:  # needs the whole text (a stop string may span deltas)
            text = self.detok.text
            matched, visible = self.stop.visible_text(text)
            if final and not matched:
                visible = text  # nothing more comes: the held-back tail is not a stop string
            delta, self.sent = visible[self.sent :], len(visible)
        u = SampleUpdate(
            self.index, delta, list(ev.token_ids), list(ev.output_logprobs),
            prompt_tokens=ev.prompt_tokens or self.num_prompt_tokens, completion_tokens=self.num_tokens,
            cached_tokens=ev.cached_tokens, worker_id=worker_id,
        )
        if matched:
            u.finish_reason = {"type": "stop", "matched": self.stop.matched}
        elif final:
            u.finish_reason = ev.finish_reason or {"type": "stop"}
            u.input_logprobs = list(ev.input_logprobs)
        return u
