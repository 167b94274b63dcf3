"""A request, as the scheduler sees it.

A request is two counters (vLLM v1's model):

* ``num_computed``: tokens whose K/V are in the KV pool;
* ``num_known``: tokens known so far, i.e. ``len(prompt_ids) + len(output_ids)``.

Each step computes some of the ``num_known - num_computed`` pending tokens. When a step reaches
``num_known``, the logits of the last token are sampled and one output token is appended, so the
next step has exactly one pending token (decode). A new prompt has all of its tokens pending; a
chunked prefill computes them over several steps; a retracted request drops its KV
(``num_computed = 0``) and recomputes prompt + output later. Prefix-cache hits and speculation are
only other ways of moving the counters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sglang.engine.constrained.base import GrammarMatcher
    from sglang.engine.sampling.params import SamplingParams
    from sglang.engine.tokenizer.detokenizer import IncrementalDetokenizer
    from sglang.engine.tokenizer.stop import StopChecker


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class FinishReason:
    """SGLang's shape: ``{"type": "stop"|"length"|"abort", "matched": token id or str}``."""

    type: str
    matched: int | str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        if self.matched is not None:
            d["matched"] = self.matched
        if self.message is not None:
            d["message"] = self.message
        return d


@dataclass(eq=False)  # identity: the scheduler looks requests up in its lists (a field-by-field __eq__ cost ~us each)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    # Logprob options: logprob_start_len < 0 means no prompt logprobs.
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False

    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None

    # KV ownership: pages held (in token order) and the req-to-token row, while admitted. The
    # first ``num_tree_pages`` belong to the prefix cache, pinned by the lock on ``tree_node``.
    pages: list[int] = field(default_factory=list)
    row: int | None = None
    num_tree_pages: int = 0
    tree_node: Any = None
    extra_key: str | None = None  # prefix-cache namespace (LoRA adapter, cache salt)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted_once: bool = False

    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stop_checker: StopChecker | None = None
    # Structured output: this sample's own matcher (regex / json_schema / ebnf), which has accepted
    # exactly ``output_ids``. Retraction keeps both, so it stays consistent.
    grammar: GrammarMatcher | None = None
    # Overlap scheduling: rows of this request's sampled tokens in batches still in flight, oldest
    # first; ``num_known`` counts them (see engine/scheduler/overlap.py).
    pending_futures: list[int] = field(default_factory=list)
    stop_matched: bool = False
    text: str = ""  # output text with any stop string trimmed
    sent_text_len: int = 0  # characters already streamed
    sent_ids_len: int = 0

    # Logprobs, SGLang's tuples (logprob, token_id, None); top lists per position.
    input_token_logprobs: list[tuple[float | None, int, None]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int, None]] | None] = field(default_factory=list)
    output_token_logprobs: list[tuple[float, int, None]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int, None]] | None] = field(default_factory=list)
    # Next prompt position whose logprob is to be recorded (a recompute after retraction skips
    # the ones already recorded). Position 0 has no logprob (nothing precedes it).
    prompt_logprobs_done: int = 1

    # Prefill/decode disaggregation: the room pairing this request's prefill and decode halves.
    bootstrap_room: int | None = None
    pd_sent_pages: int = 0  # prefill side: pages already written to the decode side
    pd_chunks: int = 0
    pd_deadline: float = 0.0
    pd_finish: FinishReason | None = None

    arrival: int = 0  # admission order; retraction picks the newest
    num_retractions: int = 0

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + len(self.pending_futures)

    @property
    def num_pending(self) -> int:
        return self.num_known - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        if pos < n:
            return self.prompt_ids[pos]
        m = len(self.output_ids)
        return self.output_ids[pos - n] if pos - n < m else -(self.pending_futures[pos - n - m] + 1)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens ``start .. end``; a token sampled by a batch still in flight (overlap scheduling)
        is the placeholder ``-(row + 1)`` the model runner resolves on the device."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        host = n + len(self.output_ids)
        if start >= n:
            out = self.output_ids[start - n : end - n]
        else:
            out = self.prompt_ids[start:] + self.output_ids[: end - n]
        if end > host:
            out += [-(f + 1) for f in self.pending_futures[max(start - host, 0) : end - host]]
        return out

    def init_logprobs(self) -> None:
        """Call once before scheduling: position 0 of the prompt is reported with no logprob."""
        if self.wants_prompt_logprobs:
            self.prompt_logprobs_done = max(self.logprob_start_len, 1)
            if self.logprob_start_len == 0:
                self.input_token_logprobs.append((None, self.prompt_ids[0], None))
                self.input_top_logprobs.append(None)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and 0 <= self.logprob_start_len < len(self.prompt_ids)
