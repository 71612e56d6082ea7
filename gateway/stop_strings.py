"""Stop strings for one request: finds the first stop string in the streamed text and holds back
any tail that could still become one.

``add(text)`` returns the part of the text that is safe to show and, once a stop string
appears, that stop string; the stop string and everything after it are never returned.
The held tail is the longest suffix that is a proper prefix of some stop string, so a stop
string can only start inside the held tail or in new text. ``flush()`` returns the held tail
when the stream ends without a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        assert all(stops), "stop strings must be non-empty"
        self._stops = tuple(stops)
        self._held = ""
        self.matched: str | None = None

    @property
    def active(self) -> bool:
        """Whether there is any stop string to look for."""
        return bool(self._stops)

    def add(self, text: str) -> tuple[str, str | None]:
        assert self.matched is None, "add() after a stop string matched"
        if not self._stops:
            return text, None
        pending = self._held + text
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = pending.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is not None:
            self._held = ""
            self.matched = best[1]
            return pending[:best[0]], best[1]
        hold = self._held_length(pending)
        self._held = pending[len(pending) - hold:] if hold else ""
        return pending[:len(pending) - hold], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _held_length(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
