"""Turns one request's streamed completion token ids into the text to send: incremental
detokenization (detokenizer.py), then stop strings (stop_strings.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epserve.gateway.detokenizer import Decoder, IncrementalDetokenizer
from epserve.gateway.stop_strings import StopStringMatcher


@dataclass(frozen=True)
class ProcessedText:
    text: str
    matched_stop: str | None = None   # a stop string appeared: the request is done
    consumed: int = 0                 # with a match: how many of the added ids, up to the one completing it


class OutputProcessor:
    def __init__(self, decoder: Decoder, stops: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(decoder)
        self._stops = StopStringMatcher(stops)

    @property
    def completion_ids(self) -> list[int]:
        return self._detokenizer.ids

    def add(self, token_ids: Sequence[int]) -> ProcessedText:
        """Several ids at once (a worker's --stream-interval, or a stream catching up) are matched
        against the stop strings one id at a time, so a match says which id completed it."""
        if len(token_ids) > 1 and self._stops.active:
            texts = []
            for i, token in enumerate(token_ids):
                processed = self.add((token,))
                texts.append(processed.text)
                if processed.matched_stop is not None:
                    return ProcessedText("".join(texts), processed.matched_stop, i + 1)
            return ProcessedText("".join(texts))
        text, matched = self._stops.add(self._detokenizer.add(token_ids))
        return ProcessedText(text, matched, len(token_ids) if matched is not None else 0)

    def finish(self) -> ProcessedText:
        """The rest of the text once the worker finished (a stop string may still appear in it)."""
        text, matched = self._stops.add(self._detokenizer.flush())
        if matched is None:
            text += self._stops.flush()
        return ProcessedText(text, matched)
