"""Flags every epserve process defines the same way, in one place (help text included).

- ``add_bind_arguments``: ``--host``, ``--port`` (the process's gRPC server);
- ``add_worker_arguments``: what an attention or expert worker needs to join a deployment
  (``--placement``, ``--advertise-host``, ``--worker-id``) and to load its weights (``--dtype``,
  ``--device``, ``--load-format``, ``--num-threads``);
- ``add_telemetry_arguments``: ``--metrics-port``, ``--otlp-endpoint``, ``--log-level``.

Each process adds its own flags around these; ``epserve up`` and ``docs/operations.md`` name the same flags.
"""

from __future__ import annotations

import argparse
import os

DTYPE_CHOICES = ("float64", "float32", "bfloat16", "float16")


def add_bind_arguments(p: argparse.ArgumentParser, default_port: int = 0) -> None:
    p.add_argument("--host", default="127.0.0.1", help="gRPC bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=default_port, help="gRPC port; 0 picks a free one (default %(default)s)")


def add_worker_arguments(p: argparse.ArgumentParser, dtype_help: str) -> None:
    from epserve.dummy_weights import LOAD_FORMAT_HELP, LOAD_FORMATS     # torch: workers only, not the gateway

    p.add_argument("--model-path", required=True, help="Hugging Face model directory")
    p.add_argument("--placement", required=True, metavar="HOST:PORT", help="placement service address")
    add_bind_arguments(p)
    p.add_argument("--advertise-host", default="", help="host others use to reach this worker (default: --host)")
    p.add_argument("--worker-id", default=os.environ.get("EPSERVE_WORKER_ID", ""),
                   help="stable worker id (default: generated; env EPSERVE_WORKER_ID)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES, help=f"{dtype_help} (default bfloat16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS, help=LOAD_FORMAT_HELP)
    p.add_argument("--num-threads", type=int, default=1, help="torch CPU threads (default 1)")


def add_telemetry_arguments(p: argparse.ArgumentParser, service_name: str, port_line: str) -> None:
    """``service_name``: the OTel service.name; ``port_line``: the NAME_PORT= line the process prints."""
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port (printed as "
                        f"METRICS_PORT=<port> before {port_line}=); default: off")
    p.add_argument("--otlp-endpoint", default="",
                   help=f"OTLP gRPC collector HOST:PORT for traces (service.name {service_name}); "
                        "default: $OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing")
    p.add_argument("--log-level", default="INFO", help="stderr logging level (default %(default)s)")
