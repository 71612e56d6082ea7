"""The expert worker's one config dataclass, built from flags in ``main()``."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from epserve.grpc_security import PLAINTEXT, Security
from epserve.process_flags import check_worker_config

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
        check_worker_config(self, "expert")
        if self.capacity is not None and not (math.isfinite(self.capacity) and self.capacity > 0):
            raise ValueError(f"--capacity must be a number > 0 or auto, got {self.capacity}")
        if not 0 < self.expert_load_duty_cycle <= 1:
            raise ValueError(f"--expert-load-duty-cycle must be in (0, 1], got {self.expert_load_duty_cycle}")
        if self.rpc_timeout_s <= 0:
            raise ValueError("--rpc-timeout-s must be > 0")


def parse_capacity(text: str) -> float | None:
    """``--capacity``: a relative speed > 0, or ``auto`` (None: measured at start-up, capacity.py)."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or auto, got {text!r}") from None
