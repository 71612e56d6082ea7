"""Picks the attention worker for a request: least outstanding tokens, ties round-robin.

A worker's outstanding tokens are the gateway's own count — prompt + max_new_tokens − generated
of every request it routed there and that has not finished — or, when larger, the
``outstanding_tokens`` the worker last reported through GetLoad (which also counts the requests
of other gateways). Thread-safe: the servicer threads call ``route``/``consume``/``release``
while the pool's refresh thread calls ``set_reported_load``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class _Assignment:
    address: str
    num_outstanding: int


class Router:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._assignments: dict[str, _Assignment] = {}   # request id -> where it runs
        self._own: dict[str, int] = {}                   # address -> outstanding tokens routed by us
        self._reported: dict[str, int] = {}              # address -> last GetLoad outstanding_tokens
        self._cursor = 0

    def load(self, address: str) -> int:
        with self._lock:
            return self._load(address)

    def _load(self, address: str) -> int:
        return max(self._own.get(address, 0), self._reported.get(address, 0))

    def pick(self, candidates: Sequence[str]) -> str | None:
        """The least-loaded candidate; equal loads take turns. None when there is none."""
        with self._lock:
            return self._pick(candidates)

    def _pick(self, candidates: Sequence[str]) -> str | None:
        if not candidates:
            return None
        ordered = sorted(set(candidates))
        start = self._cursor % len(ordered)
        self._cursor += 1
        rotated = ordered[start:] + ordered[:start]
        return min(rotated, key=self._load)  # min keeps the first of equals: the rotation decides ties

    def route(self, request_id: str, candidates: Sequence[str], num_outstanding: int) -> str | None:
        """Picks a worker and charges it ``num_outstanding`` tokens for this request (atomically,
        so concurrent requests spread out). A request routed again moves its charge."""
        with self._lock:
            address = self._pick(candidates)
            if address is not None:
                self._release(request_id)
                self._assignments[request_id] = _Assignment(address, num_outstanding)
                self._own[address] = self._own.get(address, 0) + num_outstanding
            return address

    def consume(self, request_id: str, num_tokens: int) -> None:
        """The request generated ``num_tokens`` more tokens."""
        with self._lock:
            assignment = self._assignments.get(request_id)
            if assignment is None:
                return
            num_tokens = min(num_tokens, assignment.num_outstanding)
            assignment.num_outstanding -= num_tokens
            self._own[assignment.address] -= num_tokens

    def release(self, request_id: str) -> None:
        with self._lock:
            self._release(request_id)

    def _release(self, request_id: str) -> None:
        assignment = self._assignments.pop(request_id, None)
        if assignment is not None:
            self._own[assignment.address] -= assignment.num_outstanding
            if self._own[assignment.address] == 0:
                del self._own[assignment.address]

    def set_reported_load(self, address: str, outstanding_tokens: int | None) -> None:
        with self._lock:
            if outstanding_tokens is None:
                self._reported.pop(address, None)
            else:
                self._reported[address] = outstanding_tokens
