"""Incremental (streaming) detokenization of one request's output tokens.

Decoding token by token and concatenating does not work: a character can span several tokens
(byte-level BPE splits an emoji into byte tokens; SentencePiece has byte-fallback tokens), and some
decoders change a token's text depending on its position (SentencePiece strips the leading space of
the first token it decodes). So the text is decoded through a sliding window of two offsets into the
token list:

    ids:  ... | prefix_offset ........ read_offset ........ len(ids)
                 ^ already streamed,     ^ not yet streamed
                   kept as context

``prefix_text = decode(ids[prefix_offset:read_offset])`` was streamed already;
``new_text = decode(ids[prefix_offset:])`` is the same text plus whatever the new tokens add. The
difference is streamed, unless ``new_text`` ends in U+FFFD, the replacement character a decoder
emits for an incomplete UTF-8 sequence: then the tokens are held back until the character completes.
When text is streamed, the window moves: the streamed tokens become the context of the next window.
Every read offset therefore sits on a character boundary, which is why the streamed deltas add up to
the decode of all output tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from sglang.engine.tokenizer.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
"""What decoders emit for bytes that are not (yet) valid UTF-8."""

PROMPT_CONTEXT_TOKENS = 5
"""How many trailing prompt tokens seed the first window (as SGLang and vLLM do)."""


class IncrementalDetokenizer:
    """Turns one request's output token ids into streamed text deltas.

    Contract:
    - ``add(ids)`` returns the newly stable text; it never returns text that ends in a character cut
      in the middle of its UTF-8 bytes (it holds those tokens back until the character completes).
    - ``flush()`` returns whatever is held back (possibly an incomplete character, as U+FFFD) and is
      called once, when the request finishes; ``add`` may not be called after it.
    - ``text`` is the concatenation of all returned deltas. After ``flush()`` it equals
      ``tokenizer.decode(output_ids, skip_special_tokens, spaces_between_special_tokens)`` for
      byte-level BPE tokenizers (Llama-3, Qwen, GPT-2, SmolLM2) with or without ``prompt_ids``.
      For SentencePiece tokenizers it equals it when ``prompt_ids`` is None; with ``prompt_ids``
      the first token keeps the leading space that a standalone decode strips, as in SGLang/vLLM.
      One more SentencePiece exception: HF's ByteFallback decoder turns a whole run of byte tokens
      into U+FFFD when any byte in it is invalid, so an invalid byte right after a streamed emoji
      makes ``decode()`` replace that emoji too, while the stream keeps it (only garbage output).
    - Not thread-safe; one instance per request (per choice when ``n > 1``).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = self._prompt_context(prompt_ids)
        self._num_context = len(context)
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]), cached
        self._text_parts: list[str] = []
        self._text_len = 0
        self._flushed = False

    # ------------------------------------------------------------------ public

    @property
    def output_ids(self) -> list[int]:
        """All output token ids added so far (the prompt context excluded)."""
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """All text streamed so far (the concatenation of every delta returned)."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    @property
    def num_pending_tokens(self) -> int:
        """Output tokens whose text is held back (waiting for a character to complete)."""
        return len(self._ids) - self._read_offset

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text that became stable ("" when nothing did)."""
        if self._flushed:
            raise RuntimeError("add() after flush()")
        if not token_ids:
            return ""
        self._ids.extend(int(t) for t in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return everything still held back; the request is over."""
        if self._flushed:
            return ""
        delta = self._advance(final=True) if self._read_offset < len(self._ids) else ""
        self._flushed = True
        return delta

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def _prompt_context(self, prompt_ids: Sequence[int] | None) -> list[int]:
        """The last prompt tokens, unless they end inside a character (then no context)."""
        if not prompt_ids:
            return []
        tail = [int(t) for t in prompt_ids[-PROMPT_CONTEXT_TOKENS:]]
        if self._decode(tail).endswith(REPLACEMENT_CHAR):
            return []
        return tail

    def _advance(self, final: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        prefix_text = self._prefix_text
        new_text = self._decode(self._ids[self._prefix_offset :])
        if not final and (new_text.endswith(REPLACEMENT_CHAR) or len(new_text) <= len(prefix_text)):
            # A character is cut in the middle of its bytes: wait for the rest. Or the new tokens
            # added no text (skipped special tokens): keep the window so the next token still
            # decodes with the streamed text as its context.
            return ""
        # Decoders that rewrite text across the window (clean_up_tokenization_spaces) can make
        # new_text not start with prefix_text; what was streamed cannot be taken back, so the
        # delta is cut at the same length either way.
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        if delta:
            self._text_parts.append(delta)
            self._text_len += len(delta)
        return delta

    def __repr__(self) -> str:
        return (
            f"IncrementalDetokenizer(output_tokens={len(self._ids) - self._num_context}, "
            f"pending={self.num_pending_tokens}, text_len={self._text_len})"
        )
