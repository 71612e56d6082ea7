"""Errors the plain classes raise; the servicers turn each into one gRPC status code.

The logic (registry, maps, load) knows nothing of gRPC: it raises one of these with a
message that names the offending field or says what to change; ``service.py`` maps
``PlacementError.code`` to ``grpc.StatusCode`` at the edge.
"""

from __future__ import annotations


class PlacementError(Exception):
    code = "INTERNAL"


class InvalidArgument(PlacementError):
    """A request field is malformed; the message names the field."""
    code = "INVALID_ARGUMENT"


class NotFound(PlacementError):
    """Unknown worker id or map version."""
    code = "NOT_FOUND"


class FailedPrecondition(PlacementError):
    """Wrong model fingerprint, stale version, or a rank held by another worker."""
    code = "FAILED_PRECONDITION"


class ResourceExhausted(PlacementError):
    """More workers of a role than the deployment expects."""
    code = "RESOURCE_EXHAUSTED"


class Unavailable(PlacementError):
    """Not ready yet (no map, world incomplete) or shutting down."""
    code = "UNAVAILABLE"


class Aborted(PlacementError):
    """A map change stopped: its prepare failed or timed out and was rolled back. The message
    says which version is in service."""
    code = "ABORTED"
