"""The grammar-mask phase of a step (schedule → run → grammar mask → sample → update).

``fill`` (right after the forward is launched) → ``apply`` (on the sampled rows' logits, before the
sampler) → ``append`` (the update phase of one sampled token). A request's matcher has accepted
exactly its output tokens; retraction keeps them both (the recompute samples no token again), and
on a decode worker ``append`` accepts the prefill's first token like any other.

Finishing: the grammar ends only on a stop (EOS) token, which the mask allows only where the grammar
may end; that finishes the request with ``stop`` even under ``ignore_eos``. Stop strings and
``max_new_tokens`` still finish it first (then the output may be incomplete, as with OpenAI). A
token the matcher rejects (possible only when other processing removed every allowed token, e.g.
``min_new_tokens`` masking the EOS that the grammar requires) finishes it with ``abort``.
Logprobs are those of the masked distribution (renormalised over the allowed tokens).
"""

from __future__ import annotations

import torch

from sglang.engine.constrained.mask import BitmaskFiller, GrammarMask
from sglang.engine.scheduler.batch import ScheduledBatch
from sglang.engine.scheduler.output_processor import OutputProcessor
from sglang.engine.scheduler.request import FinishReason, Request


class GrammarPhase:
    def __init__(self, outputs: OutputProcessor, device: torch.device | str) -> None:
        self.outputs = outputs
        self.filler = BitmaskFiller(device)

    def fill(self, batch: ScheduledBatch) -> GrammarMask | None:
        """One bitmask row per sampled entry (in batch order); None when no entry has a grammar."""
        return self.filler.fill([e.req.grammar for e in batch.entries if e.samples])

    def apply(self, logits: torch.Tensor, mask: GrammarMask | None) -> None:
        """Mask the sampled rows' logits ``[B, V]`` in place."""
        self.filler.apply(logits, mask)

    def append(
        self, req: Request, token: int, logprob: float, top: list[tuple[float, int]] | None
    ) -> FinishReason | None:
        """Advance ``req``'s grammar by ``token``, then append it; why it finished, or None."""
        g = req.grammar
        if g is None:
            return self.outputs.append_token(req, token, logprob, top)
        if not g.accept_token(token):
            return FinishReason(
                "abort", message=f"the grammar does not allow token {token} here (other sampling constraints "
                "removed every token it allows)",
            )
        reason = self.outputs.append_token(req, token, logprob, top)
        if g.is_terminated() and (reason is None or reason.type != "stop"):
            reason = FinishReason("stop", matched=token)
        return reason
