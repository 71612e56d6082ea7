"""Flags every epserve process defines the same way, in one place (help text included).

- ``add_bind_arguments``: ``--host``, ``--port`` (the process's gRPC server);
- ``add_worker_arguments``: what an attention or expert worker needs to join a deployment
  (``--placement``, ``--advertise-host``, ``--worker-id``) and to load its weights (``--dtype``,
  ``--device``, ``--load-format``, ``--num-threads``), and ``check_worker_config``, what a worker
  config checks of them;
- ``add_telemetry_arguments``: ``--metrics-port``, ``--otlp-endpoint``, ``--log-level``.

A flag's default is its config field's default (``config_defaults``), never written twice, and
``config_kwargs`` carries the parsed flags back into the config. Each process adds its own flags
around these; ``epserve up`` and ``docs/operations.md`` name the same flags.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any

DTYPE_CHOICES = ("float64", "float32", "bfloat16", "float16")
LOG_LEVEL_ENV = "EPSERVE_LOG_LEVEL"
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"


def config_defaults(config_class: type) -> dict[str, Any]:
    """The plain defaults of a config dataclass's fields, by field name: what its flags default to."""
    return {f.name: f.default for f in fields(config_class) if f.default is not MISSING}


def config_kwargs(config_class: type, args: argparse.Namespace, **given: Any) -> dict[str, Any]:
    """The config's constructor arguments: each init field that has a flag of its own name, then ``given``
    (fields whose flags need converting, and fields named otherwise)."""
    kwargs = {f.name: getattr(args, f.name) for f in fields(config_class) if f.init and hasattr(args, f.name)}
    return {**kwargs, **given}


def add_bind_arguments(p: argparse.ArgumentParser, defaults: Mapping[str, Any], port_line: str) -> None:
    """``port_line``: the NAME_PORT= line the process prints once it listens."""
    p.add_argument("--host", default=defaults["host"], help="gRPC bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=defaults["port"],
                   help=f"gRPC port; 0 picks a free one, printed as {port_line}=<port> on stdout "
                        "(default %(default)s)")


def add_worker_arguments(p: argparse.ArgumentParser, defaults: Mapping[str, Any], dtype_help: str,
                         port_line: str) -> None:
    from epserve.dummy_weights import LOAD_FORMAT_HELP, LOAD_FORMATS     # torch: workers only, not the gateway

    p.add_argument("--model-path", required=True, help="Hugging Face model directory")
    p.add_argument("--placement", required=True, metavar="HOST:PORT", help="placement service address")
    add_bind_arguments(p, defaults, port_line)
    p.add_argument("--advertise-host", default=defaults["advertise_host"],
                   help="host others use to reach this worker (default: --host)")
    p.add_argument("--worker-id", default=os.environ.get("EPSERVE_WORKER_ID", defaults["worker_id"]),
                   help="stable worker id (default: generated; env EPSERVE_WORKER_ID)")
    p.add_argument("--dtype", default=defaults["dtype"], choices=DTYPE_CHOICES,
                   help=f"{dtype_help} (default %(default)s)")
    p.add_argument("--device", default=defaults["device"], help="torch device (default %(default)s)")
    p.add_argument("--load-format", default=defaults["load_format"], choices=LOAD_FORMATS, help=LOAD_FORMAT_HELP)
    p.add_argument("--num-threads", type=int, default=defaults["num_threads"],
                   help="torch CPU threads (default %(default)s)")


def check_worker_config(config: Any, id_prefix: str) -> None:
    """What a worker config's ``__post_init__`` checks of the flags above, and the defaults it fills: an
    empty ``advertise_host`` becomes the bind host (loopback for a wildcard bind), an empty ``worker_id``
    ``<id_prefix>-<hostname>-<6 hex>``."""
    from epserve.dummy_weights import check_load_format

    if config.dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {DTYPE_CHOICES}, got {config.dtype!r}")
    if ":" not in config.placement:
        raise ValueError(f"--placement must be HOST:PORT, got {config.placement!r}")
    check_load_format(config.load_format)
    if config.metrics_port is not None and not 0 <= config.metrics_port <= 65535:
        raise ValueError(f"--metrics-port must be in 0..65535 (0 = a free port), got {config.metrics_port}")
    if not config.advertise_host:
        config.advertise_host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    if not config.worker_id:
        config.worker_id = f"{id_prefix}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def add_telemetry_arguments(p: argparse.ArgumentParser, defaults: Mapping[str, Any], service_name: str,
                            port_line: str) -> None:
    """``service_name``: the OTel service.name; ``port_line``: the NAME_PORT= line the process prints.
    ``--otlp-endpoint`` and ``--log-level`` fall back on the environment (``resolve_telemetry_arguments``)."""
    p.add_argument("--metrics-port", type=int, default=defaults["metrics_port"],
                   help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port (printed as "
                        f"METRICS_PORT=<port> before {port_line}=); default: off")
    p.add_argument("--otlp-endpoint", default=defaults["otlp_endpoint"],
                   help=f"OTLP gRPC collector HOST:PORT for traces (service.name {service_name}); "
                        f"default: ${OTLP_ENDPOINT_ENV}, else no tracing")
    p.add_argument("--log-level", default="",
                   help=f"stderr logging level (default: ${LOG_LEVEL_ENV}, else INFO)")


def resolve_telemetry_arguments(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Fill ``--otlp-endpoint`` and ``--log-level`` left unset from the environment (called once, by
    ``process.run_process``)."""
    args.otlp_endpoint = args.otlp_endpoint or environ.get(OTLP_ENDPOINT_ENV, "")
    args.log_level = args.log_level or environ.get(LOG_LEVEL_ENV, "") or "INFO"
