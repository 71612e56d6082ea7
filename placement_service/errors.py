"""Errors the plain classes raise: ``StatusError``s (epserve/status_error.py), one status code each.

The logic (registry, maps, load) knows nothing of gRPC: it raises one of these with a
message that names the offending field or says what to change; ``service.py`` answers the
call with the status it carries at the edge.
"""

from __future__ import annotations

from epserve.status_error import StatusCode, StatusError


class PlacementError(StatusError):
    code = StatusCode.INTERNAL


class InvalidArgument(PlacementError):
    """A request field is malformed; the message names the field."""
    code = StatusCode.INVALID_ARGUMENT


class NotFound(PlacementError):
    """Unknown worker id or map version."""
    code = StatusCode.NOT_FOUND


class FailedPrecondition(PlacementError):
    """Wrong model fingerprint, stale version, or a rank held by another worker."""
    code = StatusCode.FAILED_PRECONDITION


class ResourceExhausted(PlacementError):
    """More workers of a role than the deployment expects."""
    code = StatusCode.RESOURCE_EXHAUSTED


class Unavailable(PlacementError):
    """Not ready yet (no map, world incomplete) or shutting down."""
    code = StatusCode.UNAVAILABLE


class Aborted(PlacementError):
    """A map change stopped: its prepare failed or timed out and was rolled back. The message
    says which version is in service."""
    code = StatusCode.ABORTED
