"""AckBoard: what workers acknowledged, and a way to wait for it with a deadline.

``record`` is called from AckPlacement handlers (gRPC threads); ``poke`` from anything else
a waiter's condition may depend on (heartbeats, health changes, shutdown). ``wait_for``
runs on the rebalancer's thread: it evaluates its predicate *without* holding the board's
condition (the predicate reads the controller under the controller's lock, and handlers
call ``record`` after releasing that lock, so the two locks are never nested), then sleeps
until something changed or the deadline passed. A change between the evaluation and the
sleep is not lost: the sleep only starts if the change counter has not moved.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from epserve.placement_types import UpdatePhase

Verdict = TypeVar("Verdict")


class BoardClosed(Exception):
    """The placement service is shutting down; waiters give up."""


@dataclass(frozen=True)
class Ack:
    ok: bool
    error: str = ""


class AckBoard:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._acks: dict[tuple[int, UpdatePhase], dict[str, Ack]] = {}
        self._changes = 0
        self._closed = False

    def record(self, worker_id: str, version: int, phase: UpdatePhase, ok: bool, error: str = "") -> None:
        with self._cond:
            self._acks.setdefault((version, phase), {})[worker_id] = Ack(ok, error)
            self._changes += 1
            self._cond.notify_all()

    def acks(self, version: int, phase: UpdatePhase) -> dict[str, Ack]:
        with self._cond:
            return dict(self._acks.get((version, phase), {}))

    def forget_below(self, version: int) -> None:
        """Drop acks of versions older than ``version`` (bounded memory)."""
        with self._cond:
            for key in [key for key in self._acks if key[0] < version]:
                del self._acks[key]

    def poke(self) -> None:
        with self._cond:
            self._changes += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, verdict: Callable[[], Verdict | None], timeout_s: float,
                 recheck_s: float = 0.5) -> Verdict | None:
        """The first non-None ``verdict()``, or None once ``timeout_s`` has passed. Re-evaluates
        on every change and at least every ``recheck_s`` (time-based conditions such as health).
        Raises BoardClosed on shutdown."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                if self._closed:
                    raise BoardClosed()
                seen = self._changes
            result = verdict()
            if result is not None:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._changes != seen, timeout=min(remaining, recheck_s))
