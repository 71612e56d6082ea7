"""The server interceptor every epserve gRPC server runs (``grpc_server.serve_grpc`` installs it).

For every RPC, in this order:

1. Token: when the server has one, a call without ``authorization: Bearer <token>`` metadata (or
   with another token) ends UNAUTHENTICATED before the handler runs. Health and reflection are
   open (probes hold no secret). Compared in constant time.
2. Undecodable request: bytes that do not parse as the method's request message end
   INVALID_ARGUMENT (gRPC itself would answer INTERNAL "Exception deserializing request!").
3. Unknown errors: an exception escaping a handler (or its response stream) is logged with its
   traceback and ends INTERNAL with the exception's type — never UNKNOWN.
4. Bounded details: a status message is cut to MAX_DETAILS_CHARS, so an error that quotes a
   request field (an id, a path) can never grow with the input (nor pass gRPC's header limit
   and turn into RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator

import grpc

from epserve.grpc_security import METADATA_KEY, SCHEME

logger = logging.getLogger(__name__)

MAX_DETAILS_CHARS = 1000
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


def clip(text: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


class GuardedContext:
    """The handler's view of its ``grpc.ServicerContext``: the same, with status details clipped and
    a record of whether the handler aborted (``context.abort`` raises a bare ``Exception``)."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self.aborted = False

    def abort(self, code: grpc.StatusCode, details: str):
        self.aborted = True
        self._context.abort(code, clip(details or ""))

    def abort_with_status(self, status):
        self.aborted = True
        self._context.abort_with_status(status)

    def set_details(self, details: str) -> None:
        self._context.set_details(clip(details or ""))

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class GuardInterceptor(grpc.ServerInterceptor):
    """``token``: the calls' required token ("" = none required)."""

    def __init__(self, token: str = "") -> None:
        self._expected = (SCHEME + token).encode() if token else b""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        service = method.lstrip("/").partition("/")[0]
        if self._expected and service not in OPEN_SERVICES and not self._authorized(
                handler_call_details.invocation_metadata or ()):
            return _replace_behavior(handler, lambda _inner, streaming: _unauthenticated(streaming))
        return _replace_behavior(handler, lambda inner, streaming: _guarded(inner, streaming, method))

    def _authorized(self, metadata) -> bool:
        for key, value in metadata:
            if key == METADATA_KEY:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False


def _replace_behavior(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable]):
    streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
    inner = (handler.stream_stream if streaming_out else handler.stream_unary) if streaming_in \
        else (handler.unary_stream if streaming_out else handler.unary_unary)
    behavior = wrap(inner, streaming_out)
    deserializer = handler.request_deserializer
    if not streaming_in and deserializer is not None:
        deserializer = _tolerant(deserializer)
    factory = ((grpc.stream_stream_rpc_method_handler if streaming_out else grpc.stream_unary_rpc_method_handler)
               if streaming_in else
               (grpc.unary_stream_rpc_method_handler if streaming_out else grpc.unary_unary_rpc_method_handler))
    return factory(behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)


def _tolerant(deserializer: Callable) -> Callable:
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - answered INVALID_ARGUMENT by the behavior
            return _Undecodable(exc)
    return deserialize


def _unauthenticated(streaming: bool) -> Callable:
    message = "this endpoint needs the deployment's token (--auth-token-file; gRPC metadata authorization: Bearer …)"
    if streaming:
        def stream(request, context) -> Iterator:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - abort raised
        return stream

    def unary(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return unary


def _guarded(inner: Callable, streaming: bool, method: str) -> Callable:
    def check_request(request, context: GuardedContext) -> None:
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message for {method}: "
                                                            f"{type(request.error).__name__}")

    def fail(exc: Exception, context: GuardedContext) -> None:
        if context.aborted:
            raise exc
        logger.error("%s failed: %s", method, exc, exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, clip(f"{method} failed: {type(exc).__name__}: {exc}", 300))

    if streaming:
        def stream(request, context) -> Iterator:
            guarded = GuardedContext(context)
            check_request(request, guarded)
            try:
                yield from inner(request, guarded)
            except Exception as exc:  # noqa: BLE001 - INTERNAL, never UNKNOWN
                fail(exc, guarded)
        return stream

    def unary(request, context):
        guarded = GuardedContext(context)
        check_request(request, guarded)
        try:
            return inner(request, guarded)
        except Exception as exc:  # noqa: BLE001 - INTERNAL, never UNKNOWN
            fail(exc, guarded)
    return unary
