"""Errors the gateway's plain classes raise: ``StatusError``s (epserve/status_error.py) whose
message is meant for the client; the servicers answer each with the status its code names."""

from __future__ import annotations

from epserve.status_error import StatusCode, StatusError


class GatewayError(StatusError):
    """A request the gateway cannot serve."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message, code)


class ValidationError(GatewayError):
    """A bad request field; ``field`` names it as the client wrote it (e.g. ``sampling.top_p``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(StatusCode.INVALID_ARGUMENT, f"{field}: {message}")
        self.field = field
