"""HF tokenizer wrapper: encode, decode, chat templates and the end-of-sequence ids of a model folder.

The engine speaks token ids; this class is the one place that turns text into ids and back. It wraps a
``transformers`` tokenizer loaded from a local folder (never the hub) and adds what the engine needs
on top: the full set of end-of-sequence ids (tokenizer, ``generation_config.json`` and ``config.json``
may each name different ones) and chat templates that fail loudly when a model has none.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from sglang.engine.tokenizer.chat import normalize_messages

logger = logging.getLogger(__name__)


def _as_id_list(value: Any) -> list[int]:
    """``eos_token_id`` fields may be absent, an int or a list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """A tokenizer for one model folder.

    Contract:
    - ``encode``/``decode`` are the HF tokenizer's, with the defaults SGLang uses (decode skips
      special tokens).
    - ``eos_token_ids`` is the union, in that order and without duplicates, of the tokenizer's eos
      token, ``generation_config.json``'s ``eos_token_id`` and ``config.json``'s ``eos_token_id``.
    - ``apply_chat_template``/``encode_chat`` raise ``ValueError`` when the tokenizer has no chat
      template and none is passed. ``encode_chat`` never adds special tokens beyond what the template
      writes (templates write their own BOS).
    - Instances are read-only after construction and safe to share between requests in one thread
      (the HF fast tokenizer itself is not guaranteed thread-safe under concurrent mutation, and we
      never mutate it).
    """

    def __init__(self, hf_tokenizer: Any, path: str | None = None) -> None:
        self._hf = hf_tokenizer
        self.path = path
        self._eos_token_ids = self._collect_eos_ids(hf_tokenizer, path)
        self._all_special_ids = sorted({int(i) for i in hf_tokenizer.all_special_ids})

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> Tokenizer:
        """Load the tokenizer from a local folder (``tokenizer.json`` / ``tokenizer_config.json``).

        Never contacts the hub: ``local_files_only=True`` is always passed. Extra keyword arguments go
        to ``AutoTokenizer.from_pretrained`` (for example ``trust_remote_code``).
        """
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder not found: {path!r}")
        from transformers import AutoTokenizer  # deferred: importing transformers costs seconds

        kwargs.setdefault("local_files_only", True)
        hf = AutoTokenizer.from_pretrained(path, **kwargs)
        return cls(hf, path=path)

    @staticmethod
    def _collect_eos_ids(hf: Any, path: str | None) -> list[int]:
        ids: list[int] = []
        ids += _as_id_list(getattr(hf, "eos_token_id", None))
        if path is not None:
            ids += _as_id_list(_read_json(os.path.join(path, "generation_config.json")).get("eos_token_id"))
            config = _read_json(os.path.join(path, "config.json"))
            ids += _as_id_list(config.get("eos_token_id"))
            # Multimodal configs keep the language model's ids one level down.
            text_config = config.get("text_config")
            if isinstance(text_config, dict):
                ids += _as_id_list(text_config.get("eos_token_id"))
        seen: set[int] = set()
        unique = []
        for i in ids:
            if i not in seen:
                seen.add(i)
                unique.append(i)
        return unique

    # ------------------------------------------------------------------ properties

    @property
    def hf(self) -> Any:
        """The underlying ``transformers`` tokenizer (read it, do not mutate it)."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce: base vocabulary plus added tokens."""
        return len(self._hf)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation (see the class contract); may be empty."""
        return list(self._eos_token_ids)

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own eos id (the first of ``eos_token_ids``), or None."""
        return self._eos_token_ids[0] if self._eos_token_ids else None

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._hf.pad_token_id

    @property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of the tokenizer's special tokens (bos, eos, pad, unk, additional ones)."""
        return list(self._all_special_ids)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._hf, "chat_template", None)
        return template if isinstance(template, str) and template else None

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` lets the tokenizer add its BOS/EOS (if any)."""
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """Text of ``ids``. Incomplete UTF-8 byte sequences decode to U+FFFD.

        ``spaces_between_special_tokens`` only affects slow (Python) tokenizers; fast tokenizers
        ignore it, as in HF.
        """
        return self._hf.decode(
            list(ids),
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
        )

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self._hf.convert_ids_to_tokens(list(ids)))

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render an OpenAI-style conversation to the prompt text.

        ``messages`` are dicts with ``role`` and ``content`` (a string, or a list of OpenAI content
        parts; text-only lists are joined into one string). Extra keyword arguments reach the
        template (``chat_template=`` overrides the tokenizer's own, others such as
        ``enable_thinking`` become template variables). Raises ``ValueError`` when there is no
        template.
        """
        template = kwargs.pop("chat_template", None) or self.chat_template
        if template is None:
            raise ValueError(
                f"tokenizer at {self.path!r} has no chat template; pass a prompt instead of messages "
                "or provide chat_template="
            )
        kwargs.pop("tokenize", None)
        rendered = self._hf.apply_chat_template(
            normalize_messages(messages),
            tools=tools,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
        if not isinstance(rendered, str):  # a batch was passed; we render one conversation only
            raise TypeError("apply_chat_template renders a single conversation")
        return rendered

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered conversation (no special tokens added beyond the template's)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
        )
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eos_token_ids={self._eos_token_ids})"
