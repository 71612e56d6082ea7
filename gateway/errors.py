"""Errors the gateway's plain classes raise; the servicer maps ``ErrorCode`` to a gRPC status code
of the same name."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


class GatewayError(Exception):
    """A request the gateway cannot serve; ``message`` is meant for the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ValidationError(GatewayError):
    """A bad request field; ``field`` names it as the client wrote it (e.g. ``sampling.top_p``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(ErrorCode.INVALID_ARGUMENT, f"{field}: {message}")
        self.field = field
