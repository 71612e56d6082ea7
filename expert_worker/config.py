"""The expert worker's one config dataclass, built from flags in ``main()``."""

from __future__ import annotations

import argparse
import math
import socket
import uuid
from dataclasses import dataclass, field

from epserve.dummy_weights import check_load_format
from epserve.grpc_security import PLAINTEXT, Security
from epserve.process_flags import DTYPE_CHOICES as DTYPES

DEFAULT_DUTY_CYCLE = 0.25  # bench/results/rebalance_live_cpu.md: p99 ITL x1.32 at 1.0, x1.15 at 0.25


@dataclass
class ExpertWorkerConfig:
    model_path: str
    placement: str                          # host:port of the placement service
    host: str = "127.0.0.1"
    port: int = 0                           # gRPC (health) port; 0 = pick a free one
    advertise_host: str = ""
    worker_id: str = ""                     # "" = generated: expert-<hostname>-<6 hex digits>
    dtype: str = "bfloat16"
    device: str = "cpu"
    load_format: str = "auto"               # auto | safetensors | dummy (random weights, no checkpoint read)
    moe_runner_backend: str = "auto"
    capacity: float | None = 1.0            # relative expert throughput, for placement; None = measure (auto)
    rpc_timeout_s: float = 10.0
    num_threads: int = 1
    expert_load_duty_cycle: float = DEFAULT_DUTY_CYCLE    # share of wall time a live map change may spend loading
    metrics_port: int | None = None         # Prometheus /metrics; None = off, 0 = a free port
    otlp_endpoint: str = ""                 # OTLP gRPC collector HOST:PORT; "" = no tracing
    security: Security = field(default=PLAINTEXT, repr=False)   # the deployment's token + TLS

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if ":" not in self.placement:
            raise ValueError(f"--placement must be HOST:PORT, got {self.placement!r}")
        check_load_format(self.load_format)
        if self.capacity is not None and not (math.isfinite(self.capacity) and self.capacity > 0):
            raise ValueError(f"--capacity must be a number > 0 or auto, got {self.capacity}")
        if not 0 < self.expert_load_duty_cycle <= 1:
            raise ValueError(f"--expert-load-duty-cycle must be in (0, 1], got {self.expert_load_duty_cycle}")
        if self.rpc_timeout_s <= 0:
            raise ValueError("--rpc-timeout-s must be > 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in 0..65535 (0 = a free port), got {self.metrics_port}")
        if not self.advertise_host:
            self.advertise_host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if not self.worker_id:
            self.worker_id = f"expert-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def parse_capacity(text: str) -> float | None:
    """``--capacity``: a relative speed > 0, or ``auto`` (None: measured at start-up, capacity.py)."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or auto, got {text!r}") from None
