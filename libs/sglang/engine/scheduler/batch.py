"""What the schedule phase produces: which requests compute how many tokens this step."""

from __future__ import annotations

from dataclasses import dataclass, field

from sglang.engine.runner.forward_batch import ForwardMode
from sglang.engine.scheduler.request import Request


@dataclass
class Entry:
    """Request ``req`` computes tokens ``start .. start + num_tokens`` this step."""

    req: Request
    start: int
    num_tokens: int
    # Absolute positions whose logits are needed (prompt logprobs), excluding the sampling one.
    logprob_positions: list[int] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the last known token, so a new token is sampled."""
        return self.end == self.req.num_known


@dataclass
class ScheduledBatch:
    mode: ForwardMode
    entries: list[Entry]

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)
