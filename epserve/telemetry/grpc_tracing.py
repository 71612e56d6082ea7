"""W3C trace context over gRPC metadata: a client interceptor that injects, a server interceptor
that extracts and records a SERVER span per RPC. Get them from ``Tracing.client_interceptors()``
and ``Tracing.server_interceptors()`` (empty lists when tracing is off).

Client side: every call (unary or streaming) carries ``traceparent`` (and ``tracestate`` when set)
of the span current when the call is made. No CLIENT span is recorded: the caller's own span
(e.g. the gateway's Generate SERVER span) is the parent of the server's span.

Server side: a SERVER span named ``pkg.Service/Method`` with ``rpc.system``, ``rpc.service``,
``rpc.method`` and ``rpc.grpc.status_code``. The span is current while the handler runs — for a
streaming response, during every ``next()`` of the handler's iterator (all run in one
``contextvars.Context`` kept for the RPC, so spans a handler opens across ``yield``s nest right),
and it ends when the stream ends (exhausted, raised, or the RPC terminated, e.g. cancelled by the client), not when the
handler returns its iterator. Status ERROR follows the OTel gRPC convention for servers: only
UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS (caller mistakes
such as INVALID_ARGUMENT, or a client's CANCELLED, are not server errors; the code is still
an attribute).

Threads: both run in gRPC's threads; the server span's end is guarded by a lock because the
RPC-termination callback can race the handler's thread.
"""

from __future__ import annotations

import collections
import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_SERVER_ERROR_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                                 grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


# ---- client ----------------------------------------------------------------------------------


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class TracingClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                               grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the current span's ``traceparent``/``tracestate`` to every call's metadata."""

    def _with_context(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        if not carrier:  # no valid current span
            return details
        metadata = [*(details.metadata or ()), *carrier.items()]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_context(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_context(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_context(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_context(client_call_details), request_iterator)


# ---- server ----------------------------------------------------------------------------------


class _ServerSpan:
    """One RPC's SERVER span; ``finish`` is idempotent and thread-safe."""

    def __init__(self, span: Span, context: grpc.ServicerContext) -> None:
        self.span, self.grpc_context = span, context
        self.otel_context = trace.set_span_in_context(span)
        self._lock = threading.Lock()
        self._done = False

    def finish(self, error: BaseException | None = None, *, terminated: bool = False) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        code = _code_of(self.grpc_context)
        if code is None:
            if error is not None:
                code = grpc.StatusCode.UNKNOWN
            elif terminated:  # the RPC ended before the handler did: the client went away
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.OK
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if error is not None and not _is_abort(error, self.grpc_context):
            self.span.record_exception(error)
        if code in _SERVER_ERROR_CODES:
            details = _details_of(self.grpc_context) or (repr(error) if error is not None else "")
            self.span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details else code.name))
        self.span.end()


def _code_of(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    try:
        return context.code()
    except (AttributeError, NotImplementedError):
        return None


def _details_of(context: grpc.ServicerContext) -> str:
    try:
        details = context.details()
    except (AttributeError, NotImplementedError):
        return ""
    return details.decode("utf-8", "replace") if isinstance(details, bytes) else (details or "")


def _is_abort(error: BaseException, context: grpc.ServicerContext) -> bool:
    """``context.abort`` raises a bare Exception after setting the code: not worth an exception event."""
    return type(error) is Exception and not error.args and _code_of(context) is not None


class _TracedResponses:
    """Wraps a handler's response iterator. Every ``next()`` runs in one ``contextvars.Context``
    private to this RPC, with the SERVER span current: context the handler sets before a
    ``yield`` (a ``with tracing.span(...)`` around several yields) is still there after it."""

    def __init__(self, responses: Iterator, server_span: _ServerSpan, context: contextvars.Context) -> None:
        self._responses, self._server_span, self._context = responses, server_span, context

    def __iter__(self) -> _TracedResponses:
        return self

    def __next__(self):
        try:
            return self._context.run(next, self._responses)
        except StopIteration:
            self._server_span.finish()
            raise
        except BaseException as exc:
            self._server_span.finish(exc)
            raise

    def __del__(self) -> None:
        # An abandoned stream (client cancelled): close the handler's generator inside the RPC's
        # context so its ``finally``/``with`` blocks end their spans and detach cleanly.
        close = getattr(self._responses, "close", None)
        if close is not None:
            try:
                self._context.run(close)
            except Exception:  # noqa: BLE001 - a destructor must not raise
                pass


class TracingServerInterceptor(grpc.ServerInterceptor):
    """A SERVER span per RPC, parented on the caller's ``traceparent`` metadata (a root span if none)."""

    def __init__(self, tracer: trace.Tracer, untraced: Iterable[str] = ()) -> None:
        self._tracer = tracer
        self._untraced = frozenset(name.strip("/") for name in untraced)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        name = handler_call_details.method.lstrip("/")        # pkg.Service/Method
        service, _, method = name.partition("/")
        if service in self._untraced or name in self._untraced:
            return handler
        metadata = handler_call_details.invocation_metadata or ()

        def start(context: grpc.ServicerContext) -> _ServerSpan:
            carrier = {key: value for key, value in metadata if isinstance(value, str)}
            parent = _PROPAGATOR.extract(carrier)
            span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes={
                "rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
            return _ServerSpan(span, context)

        if handler.response_streaming:
            behavior = _streaming_behavior(handler.unary_stream or handler.stream_stream, start)
            factory = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
                else grpc.unary_stream_rpc_method_handler
        else:
            behavior = _unary_behavior(handler.unary_unary or handler.stream_unary, start)
            factory = grpc.stream_unary_rpc_method_handler if handler.request_streaming \
                else grpc.unary_unary_rpc_method_handler
        return factory(behavior, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


def _unary_behavior(inner: Callable, start: Callable[[grpc.ServicerContext], _ServerSpan]) -> Callable:
    def behavior(request_or_iterator, context):
        server_span = start(context)
        token = otel_context.attach(server_span.otel_context)
        try:
            response = inner(request_or_iterator, context)
        except BaseException as exc:
            server_span.finish(exc)
            raise
        finally:
            otel_context.detach(token)
        server_span.finish()
        return response
    return behavior


def _streaming_behavior(inner: Callable, start: Callable[[grpc.ServicerContext], _ServerSpan]) -> Callable:
    def behavior(request_or_iterator, context):
        server_span = start(context)
        # Ends the span when the RPC terminates even if the iterator is abandoned (client cancel).
        context.add_callback(lambda: server_span.finish(terminated=True))
        rpc_context = contextvars.copy_context()   # this RPC's own context; never detached
        rpc_context.run(otel_context.attach, server_span.otel_context)
        try:
            responses = rpc_context.run(inner, request_or_iterator, context)
        except BaseException as exc:
            server_span.finish(exc)
            raise
        return _TracedResponses(iter(responses), server_span, rpc_context)
    return behavior
