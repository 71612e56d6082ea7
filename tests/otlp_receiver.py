"""An in-process OTLP gRPC trace receiver for tests: point ``--otlp-endpoint`` (or
``setup_tracing(..., receiver.endpoint)``) at it and assert on the spans it collected.

    # conftest.py of a test directory (registers the fixture for its tests):
    from otlp_receiver import otlp_receiver  # noqa: F401

    def test_x(otlp_receiver):
        ... run processes with --otlp-endpoint otlp_receiver.endpoint ...
        spans = otlp_receiver.wait_for(lambda spans: any(s.name == "epserve.v1.Generation/Generate"
                                                          for s in spans), timeout_s=10)

``tests/`` is on ``sys.path`` under pytest (rootdir conftest), so ``import otlp_receiver`` works
from any test directory; ``with OtlpReceiver() as receiver:`` works without the fixture. Listens on 127.0.0.1 only; a gRPC thread pool serves Export calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

KIND_NAMES = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_NAMES = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True)
class ReceivedLink:
    trace_id: str   # 32 hex digits
    span_id: str    # 16 hex digits


@dataclass(frozen=True)
class ReceivedSpan:
    service_name: str
    name: str
    trace_id: str               # 32 hex digits
    span_id: str                # 16 hex digits
    parent_span_id: str | None  # None for a root span
    kind: str                   # "SERVER", "INTERNAL", …
    status: str                 # "UNSET", "OK", "ERROR"
    status_message: str
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)
    links: tuple[ReceivedLink, ...] = ()
    resource: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(v: common_pb2.AnyValue):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attributes(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(ReceivedSpan(
                        service_name=str(resource.get("service.name", "")), name=s.name,
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() or None,
                        kind=KIND_NAMES.get(s.kind, str(s.kind)), status=STATUS_NAMES.get(s.status.code, "?"),
                        status_message=s.status.message, start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano, attributes=_attributes(s.attributes),
                        links=tuple(ReceivedLink(link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                        resource=resource))
        self._receiver._add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Collects exported spans; ``endpoint`` is ``127.0.0.1:<port>``. Start/stop or use ``with``."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        if self.port == 0:
            raise OSError("OTLP receiver: cannot bind 127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(5.0)
            self._server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """All spans so far, once ``predicate(spans)`` holds; AssertionError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({(s.service_name, s.name) for s in self._spans})
                    raise AssertionError(f"OTLP receiver: condition not met in {timeout_s} s; "
                                         f"{len(self._spans)} spans received: {names}")
                self._changed.wait(left)
            return list(self._spans)

    def wait_for_names(self, *names: str, timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """All spans so far, once a span of each name has arrived."""
        return self.wait_for(lambda spans: set(names) <= {s.name for s in spans}, timeout_s)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver
