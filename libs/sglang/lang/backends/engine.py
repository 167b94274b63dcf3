"""``sgl.EngineBackend(engine)``: programs run in-process on a ``sglang.Engine``.

``sgl.set_default_backend(engine)`` and ``func.run(backend=engine)`` wrap an Engine in this class by
themselves. Chat roles come from the engine's tokenizer through the same ``chat_role_markers`` the
router serves; ``select`` scores every choice in one batched ``engine.generate`` call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sglang.engine.tokenizer.chat import chat_role_markers
from sglang.lang.backends.base import Backend, GenInput, choice_start, meta_of, select_meta, snapshot_deltas
from sglang.lang.choices import ChoiceDecision, choice_logprobs, decide
from sglang.lang.ir import GenParams


class EngineBackend(Backend):
    def __init__(self, engine: Any) -> None:
        if not hasattr(engine, "generate") or not hasattr(engine, "tokenizer"):
            raise TypeError(f"EngineBackend needs a sglang.Engine, got {type(engine).__name__}")
        if engine.tokenizer is None:
            raise ValueError("the engine has no tokenizer (skip_tokenizer_init); the frontend language needs one")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = str(engine.model_path)
        self._roles: dict[str, Any] | None = None
        self._roles_done = False

    def chat_roles(self) -> dict[str, Any] | None:
        if not self._roles_done:
            self._roles, self._roles_done = chat_role_markers(self.tokenizer), True
        return self._roles

    def generate(self, inp: GenInput, params: GenParams) -> tuple[str, dict[str, Any]]:
        out = self.engine.generate(prompt=inp.text, sampling_params=params.to_sampling_params())
        return out["text"], meta_of(out["meta_info"])

    def generate_stream(self, inp: GenInput, params: GenParams) -> Iterator[tuple[str, dict[str, Any] | None]]:
        yield from snapshot_deltas(
            self.engine.generate(prompt=inp.text, sampling_params=params.to_sampling_params(), stream=True)
        )

    def select(self, inp: GenInput, choices: list[str], temperature: float) -> ChoiceDecision:
        prefix_tokens = len(self.tokenizer.encode(inp.text)) if inp.text else 0
        outs = self.engine.generate(
            prompt=[inp.text + c for c in choices], sampling_params={"max_new_tokens": 0, "temperature": 0.0},
            return_logprob=True, logprob_start_len=choice_start(prefix_tokens),
        )
        per_choice = []
        for c, out in zip(choices, outs, strict=True):
            entries = [
                (lp, tid, self.tokenizer.decode([tid], skip_special_tokens=False))
                for lp, tid, _ in out["meta_info"]["input_token_logprobs"]
            ]
            per_choice.append(choice_logprobs(c, entries, out["meta_info"]["prompt_tokens"] - prefix_tokens))
        return decide(choices, per_choice, temperature, select_meta(outs))

    def cache_prefix(self, text: str) -> None:
        if text:
            self.engine.generate(prompt=text, sampling_params={"max_new_tokens": 0})

