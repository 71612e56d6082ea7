"""Incremental, UTF-8-safe detokenization of one request's completion tokens.

The prefix-offset / read-offset scheme of vLLM and TGI: the ids are decoded in a small window
``ids[prefix_offset:]``; the text of ``ids[prefix_offset:read_offset]`` was already emitted, so
the new text is what the window decodes to beyond it. When the window's text ends in U+FFFD
(a multi-byte character split across tokens, still incomplete) nothing is emitted and the
offsets stay put until a later token completes the character. Each ``read_offset`` is thus a
character boundary, and the concatenation of everything emitted (``flush`` included) equals
``decode(all_ids)``. Special tokens are skipped in the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends tokens; returns the text they complete (possibly empty)."""
        self.ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of the stream)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self.ids):
            return ""
        prefix_text = self._decoder.decode(self.ids[self._prefix_offset:self._read_offset])
        new_text = self._decoder.decode(self.ids[self._prefix_offset:])
        if (not final and new_text.endswith(REPLACEMENT_CHAR)) or len(new_text) <= len(prefix_text):
            if final:
                self._prefix_offset = self._read_offset = len(self.ids)
            return ""  # incomplete character, or only special tokens so far
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return new_text[len(prefix_text):]
