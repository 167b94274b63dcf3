"""Update phase: append a sampled token, record logprobs, detokenize, decide whether to stop."""

from __future__ import annotations

import torch

from sglang.engine.sampling.logprobs import compute_logprobs, gather_token_logprobs, top_k_logprobs
from sglang.engine.scheduler.batch import Entry
from sglang.engine.scheduler.request import FinishReason, Request


class OutputProcessor:
    def __init__(self, eos_token_ids: list[int], context_length: int) -> None:
        self.eos = set(eos_token_ids)
        self.context_length = context_length

    def record_prompt_logprobs(self, e: Entry, logits: torch.Tensor) -> None:
        """``logits[i]`` are at position ``e.logprob_positions[i]``: they score prompt token p + 1."""
        req = e.req
        lp = compute_logprobs(logits)
        targets = torch.tensor([req.prompt_ids[p + 1] for p in e.logprob_positions], device=lp.device)
        vals = gather_token_logprobs(lp, targets).tolist()
        tops = top_k_logprobs(lp, [req.top_logprobs_num] * len(vals)) if req.top_logprobs_num > 0 else None
        for i, p in enumerate(e.logprob_positions):
            req.input_token_logprobs.append((vals[i], req.prompt_ids[p + 1], None))
            req.input_top_logprobs.append([(v, t, None) for v, t in tops[i]] if tops else None)
        req.prompt_logprobs_done = e.logprob_positions[-1] + 2

    def append_token(
        self, req: Request, token: int, logprob: float, top: list[tuple[float, int]] | None
    ) -> FinishReason | None:
        """Append ``token`` to ``req``; return why it finished, or None to go on."""
        p = req.params
        if len(req.output_ids) >= p.max_new_tokens:
            return FinishReason("length", matched=None)
        req.output_ids.append(token)
        if req.return_logprob:
            req.output_token_logprobs.append((logprob, token, None))
            req.output_top_logprobs.append([(v, t, None) for v, t in top] if top is not None else None)
        if req.detokenizer is not None:
            req.detokenizer.add([token])
            req.text = req.detokenizer.text
        n_out = len(req.output_ids)
        if n_out >= p.min_new_tokens:
            if p.stop_token_ids and token in p.stop_token_ids:
                return FinishReason("stop", matched=token)
            if not p.ignore_eos and token in self.eos:
                return FinishReason("stop", matched=token)
            if req.stop_checker is not None:
                matched, trimmed = req.stop_checker.check(req.text)
                if matched:
                    req.text = trimmed
                    req.stop_matched = True
                    return FinishReason("stop", matched=req.stop_checker.matched)
        if n_out >= p.max_new_tokens:
            return FinishReason("length", matched=None)
        if req.num_known >= self.context_length:
            return FinishReason("length", matched=None, message="reached the context length")
        return None

    def finalize(self, req: Request) -> None:
        """Flush the detokenizer once the request is finished."""
        if req.detokenizer is not None and not req.stop_matched:
            req.detokenizer.flush()
            req.text = req.detokenizer.text

    @staticmethod
    def streamable_text(req: Request) -> str:
        """Text safe to stream now: hold back a tail that may be the start of a stop string."""
        if req.finished or req.stop_checker is None:
            return req.text
        hold = req.stop_checker.holdback(req.text)
        return req.text[: len(req.text) - hold] if hold else req.text
