"""The request manager reports each request's life to a ``RequestObserver``: where metrics and
trace events are fed. ``NullObserver`` does nothing; ``TelemetryObserver`` feeds
``GatewayMetrics`` and annotates the request's current span.

Threads: every call for one request comes from the thread serving its RPC (``on_reject`` and
``on_start`` from ``submit``, the others while its outputs are iterated), so the span current
then is that request's ``gateway.request`` span (the servicer opens it). Calls for different
requests come from different threads: per-request state is kept under a lock.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from opentelemetry import trace

from epserve.telemetry import GatewayMetrics
from epserve.gateway.request_types import Usage
from epserve.sampling import FinishReason



class RequestObserver(Protocol):
    def on_reject(self, code: str) -> None:
        """``submit`` refused a request (``code``: gRPC status name, e.g. ``INVALID_ARGUMENT``)."""

    def on_start(self, request_id: str, num_prompt_tokens: int) -> None: ...

    def on_tokens(self, request_id: str, num_tokens: int) -> None: ...

    def on_retry(self, request_id: str, lost_address: str) -> None: ...

    def on_finish(self, request_id: str, finish_reason: FinishReason | None, usage: Usage,
                  error: str | None, code: str = "OK") -> None:
        """``code``: gRPC status name the stream ends with (``OK``, ``CANCELLED``, ``UNAVAILABLE``…)."""


class NullObserver:
    def on_reject(self, code: str) -> None:
        pass

    def on_start(self, request_id: str, num_prompt_tokens: int) -> None:
        pass

    def on_tokens(self, request_id: str, num_tokens: int) -> None:
        pass

    def on_retry(self, request_id: str, lost_address: str) -> None:
        pass

    def on_finish(self, request_id: str, finish_reason: FinishReason | None, usage: Usage,
                  error: str | None, code: str = "OK") -> None:
        pass


class _Timing:
    __slots__ = ("start", "last_token")

    def __init__(self, start: float) -> None:
        self.start = start
        self.last_token: float | None = None


class TelemetryObserver:
    """Feeds ``GatewayMetrics`` (None: metrics off) and adds ``first_token`` / ``retry`` events and
    the request's outcome attributes to the current span (a no-op span when tracing is off)."""

    def __init__(self, metrics: GatewayMetrics | None) -> None:
        self._metrics = metrics
        self._timings: dict[str, _Timing] = {}
        self._lock = threading.Lock()

    def on_reject(self, code: str) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(finish_reason="", code=code).inc()

    def on_start(self, request_id: str, num_prompt_tokens: int) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("epserve.prompt_tokens", num_prompt_tokens)
        with self._lock:
            self._timings[request_id] = _Timing(time.monotonic())
        if self._metrics is not None:
            self._metrics.requests_in_flight.inc()
            self._metrics.prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, request_id: str, num_tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            timing = self._timings.get(request_id)
        if timing is None:
            return
        first, last = timing.last_token is None, timing.last_token
        timing.last_token = now
        if first:
            trace.get_current_span().add_event("first_token")
        if self._metrics is None:
            return
        self._metrics.completion_tokens.inc(num_tokens)
        if first:
            self._metrics.time_to_first_token.observe(now - timing.start)
        else:   # a message of n tokens: n gaps of equal share
            gap = (now - last) / num_tokens
            for _ in range(num_tokens):
                self._metrics.inter_token_latency.observe(gap)

    def on_retry(self, request_id: str, lost_address: str) -> None:
        trace.get_current_span().add_event("retry", {"epserve.lost_worker": lost_address})
        if self._metrics is not None:
            self._metrics.retries.inc()

    def on_finish(self, request_id: str, finish_reason: FinishReason | None, usage: Usage,
                  error: str | None, code: str = "OK") -> None:
        reason = finish_reason.label if error is None and finish_reason is not None else ""
        with self._lock:
            timing = self._timings.pop(request_id, None)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({"epserve.completion_tokens": usage.completion_tokens,
                                 "epserve.finish_reason": reason, "epserve.status_code": code})
        if self._metrics is None:
            return
        self._metrics.requests.labels(finish_reason=reason, code=code).inc()
        if timing is not None:
            self._metrics.e2e_latency.observe(time.monotonic() - timing.start)
            self._metrics.requests_in_flight.dec()
