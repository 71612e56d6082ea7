"""Telemetry every epserve process uses: OTel tracing with W3C propagation (gRPC metadata and the
data-plane header) and Prometheus metrics per process. See ``docs/observability.md``.

Importing this package has no side effects; a process builds its ``Tracing`` and ``*Metrics``
objects in ``main()`` and passes them down.
"""

from epserve.telemetry.metrics import (AttentionWorkerMetrics, ExpertWorkerMetrics, GatewayMetrics, LoadWindow,
                                       MetricsServer, PlacementMetrics, balancedness, start_metrics_server)
from epserve.telemetry.tracing import (DEFAULT_UNTRACED_SERVICES, NO_SPAN, StepSampler, Tracing, decode_trace_context,
                                       encode_trace_context, setup_tracing, span_links_from)

__all__ = [
    "AttentionWorkerMetrics", "ExpertWorkerMetrics", "GatewayMetrics", "LoadWindow", "MetricsServer",
    "PlacementMetrics", "balancedness", "start_metrics_server",
    "DEFAULT_UNTRACED_SERVICES", "NO_SPAN", "StepSampler", "Tracing", "decode_trace_context", "encode_trace_context",
    "setup_tracing", "span_links_from",
]
