"""Tracing: one ``Tracing`` handle per process, made in ``main()`` and passed down.

``setup_tracing(service_name, otlp_endpoint)``:

- with an endpoint (``HOST:PORT`` of an OTLP gRPC collector): an SDK ``TracerProvider`` whose
  resource carries ``service.name``, sampling ``ParentBased(TraceIdRatioBased(sample_ratio))``
  (a span whose parent came over the wire follows the parent's decision), and a
  ``BatchSpanProcessor`` feeding the OTLP gRPC exporter (insecure). ``shutdown()`` flushes.
- without one: no SDK provider, no exporter, no thread. ``span()`` hands back one shared no-op
  context manager, the interceptor lists are empty, ``encode_trace_context()`` gives ``b""``.

The global tracer provider is left alone unless ``set_global=True``: the OTel API lets a
process set it once, so it is a true singleton; epserve code uses the handle instead. A
process that adds third-party OTel instrumentation (which calls ``trace.get_tracer``) passes
``set_global=True`` from its ``main()``. The *current span* lives in the OTel API's
contextvars-based context, shared by every handle: that is what propagation reads.

Data plane (one batch serves many requests): the sender puts ``encode_trace_context()`` (its
current span's W3C ``traceparent``, 55 ASCII bytes, ``b""`` unless sampled) in the batch
header; the receiver opens ``linked_span(name, contexts)``: a child of the first sampled
sender's span, linked to every sender's span, and no span at all when none was sampled.

Threads: the SDK's batch export thread (only with an endpoint). Nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.util.types import Attributes

from epserve.telemetry.grpc_tracing import TracingClientInterceptor, TracingServerInterceptor

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACEPARENT_BYTES = 55  # b"00-" + 32 hex trace id + "-" + 16 hex span id + "-" + 2 hex flags
# Spans of these gRPC services are never recorded: probes would drown everything else.
DEFAULT_UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                             "grpc.reflection.v1.ServerReflection")


class _NoSpan:
    """A reusable, reentrant context manager that yields the invalid span and records nothing."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc_info: object) -> None:
        return None


NO_SPAN = _NoSpan()


class Tracing:
    """A process's tracer plus what propagation needs. Make it with ``setup_tracing``."""

    def __init__(self, service_name: str, tracer: trace.Tracer, provider: TracerProvider | None) -> None:
        self.service_name = service_name
        self.tracer = tracer          # NoOpTracer when disabled; use for anything ``span`` lacks
        self.provider = provider      # the SDK provider, None when disabled

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def span(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes = None,
             links: Sequence[Link] | None = None, sampled: bool = True) -> AbstractContextManager[Span]:
        """``with tracing.span("attention.step") as span:`` — a span made current for the block.

        ``sampled=False`` (e.g. ``step_sampler.sample(step)`` was False) or a disabled handle
        costs one call and records nothing. Exceptions leaving the block set status ERROR.
        """
        if self.provider is None or not sampled:
            return NO_SPAN
        return self.tracer.start_as_current_span(name, kind=kind, attributes=attributes, links=links)

    def linked_span(self, name: str, contexts: Iterable[bytes], *, kind: SpanKind = SpanKind.INTERNAL,
                    attributes: Attributes = None, sampled: bool = True) -> AbstractContextManager[Span]:
        """A span for work that serves many traced senders (one data-plane batch, one engine step).

        ``contexts``: the senders' ``encode_trace_context()`` bytes (``b""`` entries ignored).
        The span is a child of the first sampled sender (so it shows in that trace's waterfall)
        and links to every sender. No sampled sender, ``sampled=False`` or tracing off: no span.
        """
        if self.provider is None or not sampled:
            return NO_SPAN
        links = span_links_from(contexts)
        sampled_senders = [link.context for link in links if link.context.trace_flags.sampled]
        if not sampled_senders:
            return NO_SPAN
        parent = trace.set_span_in_context(trace.NonRecordingSpan(sampled_senders[0]), otel_context.Context())
        return self._start_current(name, parent, kind, attributes, links)

    @contextmanager
    def _start_current(self, name: str, parent: otel_context.Context, kind: SpanKind, attributes: Attributes,
                       links: list[Link]) -> Iterator[Span]:
        span = self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes, links=links)
        with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
            yield span

    def record_span(self, name: str, parent: bytes, start_ns: int, end_ns: int, *,
                    kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes = None) -> None:
        """Record a span that already happened (``time.time_ns()`` stamps), as a child of the span
        in ``parent`` (``encode_trace_context`` bytes). Nothing when tracing is off or ``parent`` is
        empty or unsampled. For phases timed on another thread than the one that holds the
        parent, e.g. a request's queueing, prefill and decode on the engine thread."""
        if self.provider is None or not parent:
            return
        ctx = decode_trace_context(parent)
        if ctx is None or not ctx.trace_flags.sampled:
            return
        parent_context = trace.set_span_in_context(trace.NonRecordingSpan(ctx), otel_context.Context())
        span = self.tracer.start_span(name, context=parent_context, kind=kind, attributes=attributes,
                                      start_time=start_ns)
        span.end(end_time=max(end_ns, start_ns))

    def current_trace_context(self) -> bytes:
        """``encode_trace_context()`` of the current span; ``b""`` at once when tracing is off.
        Pass this bound method where a data-plane sender wants a ``Callable[[], bytes]``."""
        return b"" if self.provider is None else encode_trace_context()

    def server_interceptors(self, untraced: Iterable[str] = DEFAULT_UNTRACED_SERVICES) -> list[grpc.ServerInterceptor]:
        """For ``serve_grpc(..., interceptors=...)``: a SERVER span per RPC, parented on the caller's
        ``traceparent``. ``untraced``: full service names (``pkg.Service``) or methods
        (``pkg.Service/Method``) to skip. Empty when tracing is off."""
        if self.provider is None:
            return []
        return [TracingServerInterceptor(self.tracer, untraced)]

    def client_interceptors(self) -> list[grpc.UnaryUnaryClientInterceptor]:
        """For ``grpc.intercept_channel``: inject the current span as ``traceparent``/``tracestate``
        metadata. Empty when tracing is off."""
        if self.provider is None:
            return []
        return [TracingClientInterceptor()]

    def intercept_channel(self, channel: grpc.Channel) -> grpc.Channel:
        """``channel`` with the client interceptors; the same channel when tracing is off."""
        interceptors = self.client_interceptors()
        return grpc.intercept_channel(channel, *interceptors) if interceptors else channel

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export every ended span now; False if the exporter did not finish within ``timeout_s``."""
        return True if self.provider is None else self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporter (idempotent). Spans started afterwards are dropped."""
        if self.provider is not None:
            self.provider.shutdown()


def setup_tracing(service_name: str, otlp_endpoint: str | None, *, sample_ratio: float = 1.0,
                  resource_attributes: Mapping[str, str] | None = None, set_global: bool = False,
                  schedule_delay_s: float = 1.0, export_timeout_s: float = 5.0) -> Tracing:
    """The process's ``Tracing``. ``otlp_endpoint``: ``HOST:PORT`` (or ``http://HOST:PORT``) of an
    OTLP gRPC collector; None or "" turns tracing off at no cost.

    ``sample_ratio``: share of root traces recorded (children follow their parent).
    ``resource_attributes``: extra resource attributes, e.g. ``{"service.instance.id": "expert-3"}``.
    ``schedule_delay_s``: how often the batch processor exports. ``export_timeout_s`` bounds one
    export, and so ``shutdown()`` when the collector is down (spans are then dropped, never queued
    without bound: at most 8192 wait).
    """
    if not service_name:
        raise ValueError("setup_tracing needs a service name, e.g. 'gateway'")
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in [0, 1], got {sample_ratio}")
    if not otlp_endpoint:
        return Tracing(service_name, trace.NoOpTracer(), None)
    endpoint = _check_endpoint(otlp_endpoint)

    # SDK imports stay here: a process without tracing never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource({**(resource_attributes or {}), "service.name": service_name})
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample_ratio)), resource=resource)
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=export_timeout_s)
    provider.add_span_processor(BatchSpanProcessor(
        exporter, max_queue_size=8192, schedule_delay_millis=schedule_delay_s * 1000,
        max_export_batch_size=512, export_timeout_millis=export_timeout_s * 1000))
    if set_global:
        trace.set_tracer_provider(provider)
    return Tracing(service_name, provider.get_tracer("epserve"), provider)


def _check_endpoint(endpoint: str) -> str:
    address = endpoint.split("://", 1)[1] if "://" in endpoint else endpoint
    host, sep, port = address.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--otlp-endpoint must be HOST:PORT of an OTLP gRPC collector, got {endpoint!r}")
    return f"{host}:{port}"


# ---- data-plane propagation ------------------------------------------------------------------


def encode_trace_context(span: Span | None = None) -> bytes:
    """The W3C ``traceparent`` of ``span`` (default: the current span) as 55 ASCII bytes, for a
    data-plane header; ``b""`` when there is no span or it is not sampled (so receivers skip it)."""
    ctx = (span if span is not None else trace.get_current_span()).get_span_context()
    if not ctx.trace_flags & TraceFlags.SAMPLED:
        return b""
    return b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags)


def decode_trace_context(data: bytes) -> SpanContext | None:
    """The remote span context in ``data`` (``encode_trace_context``'s format), None if empty/invalid."""
    if len(data) != TRACEPARENT_BYTES or data[:3] != b"00-" or data[35:36] != b"-" or data[52:53] != b"-":
        return None
    try:
        trace_id, span_id, flags = int(data[3:35], 16), int(data[36:52], 16), int(data[53:55], 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


def span_links_from(contexts: Iterable[bytes]) -> list[Link]:
    """One ``Link`` per distinct valid context, in order; empty and malformed entries are skipped."""
    links: list[Link] = []
    seen: set[tuple[int, int]] = set()
    for data in contexts:
        ctx = decode_trace_context(data) if data else None
        if ctx is not None and (ctx.trace_id, ctx.span_id) not in seen:
            seen.add((ctx.trace_id, ctx.span_id))
            links.append(Link(ctx))
    return links


# ---- sampling of per-step detail ---------------------------------------------------------------


@dataclass(frozen=True)
class StepSampler:
    """Which engine steps get detailed spans (per-layer dispatch / expert compute / combine).

    ``every_n``: 1 = every step, 16 = steps 0, 16, 32, …, 0 = none. Deterministic, so every
    layer of a chosen step is traced and the attention and expert sides agree through the
    sampled flag of the data-plane context.
    """

    every_n: int = 16

    def __post_init__(self) -> None:
        if self.every_n < 0:
            raise ValueError(f"StepSampler.every_n must be >= 0 (0 = never), got {self.every_n}")

    @classmethod
    def from_ratio(cls, ratio: float) -> StepSampler:
        """``ratio`` of steps in [0, 1], rounded to one step in ``round(1 / ratio)``."""
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"step trace ratio must be in [0, 1], got {ratio}")
        return cls(0 if ratio == 0.0 else max(1, round(1.0 / ratio)))

    def sample(self, step: int) -> bool:
        return self.every_n > 0 and step % self.every_n == 0
