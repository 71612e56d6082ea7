"""``StatusError``: the one error type that carries the gRPC status it is answered with.

Plain classes (the gateway's request manager, placement's controller, a worker's dump) raise a
subclass without importing grpc; the servicer at the edge answers the call with ``abort_with``
(epserve/grpc_server.py): the status named by ``code`` and ``message``. ``code`` is a
``StatusCode`` (the names of ``grpc.StatusCode`` this project answers with), set by each subclass
or given per instance.
"""

from __future__ import annotations

import enum


class StatusCode(enum.StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    ABORTED = "ABORTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


class StatusError(Exception):
    """``message`` is meant for the caller; ``code`` defaults to the class's."""

    code: StatusCode = StatusCode.INTERNAL

    def __init__(self, message: str, code: StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = StatusCode(code)
