"""A hook for metrics and tracing: the request manager reports each request's life to a
``RequestObserver``. The gateway uses ``NullObserver`` until metrics/tracing land."""

from __future__ import annotations

from typing import Protocol

from gateway.request_types import FinishReason, Usage


class RequestObserver(Protocol):
    def on_start(self, request_id: str, num_prompt_tokens: int) -> None: ...

    def on_tokens(self, request_id: str, num_tokens: int) -> None: ...

    def on_retry(self, request_id: str, lost_address: str) -> None: ...

    def on_finish(self, request_id: str, finish_reason: FinishReason | None, usage: Usage,
                  error: str | None) -> None: ...


class NullObserver:
    def on_start(self, request_id: str, num_prompt_tokens: int) -> None:
        pass

    def on_tokens(self, request_id: str, num_tokens: int) -> None:
        pass

    def on_retry(self, request_id: str, lost_address: str) -> None:
        pass

    def on_finish(self, request_id: str, finish_reason: FinishReason | None, usage: Usage,
                  error: str | None) -> None:
        pass
