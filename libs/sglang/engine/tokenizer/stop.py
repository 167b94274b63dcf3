"""Stop strings: finding them in generated text, and not streaming half of one.

Stop strings are matched on the detokenized text, never on tokens, so a stop string split across
several tokens (or inside one token together with other text) is found. While streaming, the end of
the text may be the beginning of a stop string that the next token completes; ``holdback`` says how
many trailing characters to keep back so that no part of a stop string ever reaches the client.

Typical streaming loop (``sent`` is how many characters the client has):

    detok.add(new_ids)
    finished, visible = stop.visible_text(detok.text)
    emit(visible[sent:]); sent = len(visible)
    if finished: stop the request with finish_reason {"type": "stop", "matched": stop.matched}
"""

from __future__ import annotations

from collections.abc import Iterable


class StopChecker:
    """Stop-string matcher for one request.

    Contract:
    - ``check(text)`` looks for the earliest occurrence of any stop string in ``text`` and returns
      ``(matched, trimmed)``: ``trimmed`` ends right before the stop string (or right after it when
      ``no_stop_trim``), and nothing after it is kept. Without a match, ``trimmed`` is ``text``.
    - Successive calls must pass the same text or a longer one that extends it (the usual detokenizer
      output); only the part that could hold a new match is searched, so a call costs
      O(new text + longest stop string) rather than O(whole text). A shorter text restarts the search.
    - Once a stop string matched, the match is sticky: later calls return the same trimmed text.
    - Empty stop strings are ignored. ``matched`` names the stop string found (None before).
    """

    def __init__(self, stop: Iterable[str] | str | None, no_stop_trim: bool = False) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.stop: list[str] = list(dict.fromkeys(s for s in stops if s))
        self.no_stop_trim = no_stop_trim
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._searched_len = 0  # length of the text seen by the previous check()
        self._match_end: int | None = None  # end of the kept text once matched
        self.matched: str | None = None

    def __bool__(self) -> bool:
        return bool(self.stop)

    @property
    def max_stop_len(self) -> int:
        return self._max_len

    def check(self, text_so_far: str) -> tuple[bool, str]:
        """Return ``(matched, text trimmed at the stop string)`` for the text generated so far."""
        if self._match_end is not None:
            return True, text_so_far[: self._match_end]
        if not self.stop:
            return False, text_so_far
        if len(text_so_far) < self._searched_len:
            self._searched_len = 0
        # A match not seen before must end in the new text, so it starts at most
        # max_len - 1 characters before it.
        start = max(0, self._searched_len - self._max_len + 1)
        self._searched_len = len(text_so_far)
        best_pos = -1
        best_stop = ""
        for s in self.stop:
            pos = text_so_far.find(s, start)
            if pos < 0:
                continue
            if best_pos < 0 or pos < best_pos or (pos == best_pos and len(s) > len(best_stop)):
                best_pos, best_stop = pos, s
        if best_pos < 0:
            return False, text_so_far
        self.matched = best_stop
        self._match_end = best_pos + len(best_stop) if self.no_stop_trim else best_pos
        return True, text_so_far[: self._match_end]

    def holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string.

        Those characters may become part of a stop string with the next token; stream them only once
        ``check`` has ruled that out (or at the end of the request).
        """
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[len(text) - k :]):
                    longest = k
                    break
        return longest

    def visible_text(self, text_so_far: str) -> tuple[bool, str]:
        """``(matched, text safe to stream)``: the trimmed text on a match, else the text minus the
        ``holdback`` tail. At the end of a request without a match, stream the whole text."""
        matched, trimmed = self.check(text_so_far)
        if matched:
            return True, trimmed
        return False, text_so_far[: len(text_so_far) - self.holdback(text_so_far)]

    def __repr__(self) -> str:
        return f"StopChecker(stop={self.stop!r}, no_stop_trim={self.no_stop_trim}, matched={self.matched!r})"
