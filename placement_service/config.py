"""PlacementConfig: everything the placement service process is told, validated once.

Built by ``__main__.main`` from flags (and the environment, read only there); every object
of the service gets it through its constructor. ``__post_init__`` reads the model's
config.json (no weights) into ``model`` and checks that the deployment adds up, with
messages that say which flag to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from placement_service.model_info import ModelInfo

MOE_A2A_BACKENDS = ("local", "torch", "cuda_ipc", "mooncake", "deepep")
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass
class PlacementConfig:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    dp_size: int = 1  # D attention workers
    ep_size: int = 1  # N expert workers
    ep_num_redundant_experts: int = 0  # R
    init_expert_location: str = "trivial"  # "trivial" or a snapshot path (.json / .pt)
    moe_a2a_backend: str = "torch"
    dist_port: int = 0  # rendezvous store port, 0 = pick
    advertise_host: str | None = None  # None = host, or 127.0.0.1 when host is a wildcard
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_ms: int = 5000
    state_db: str | None = None  # SQLite path; None = in memory only
    metrics_port: int | None = None  # hook for Prometheus metrics (not built yet)
    otlp_endpoint: str = ""  # hook for OTel tracing (not built yet); accepted so launchers can pass it
    shutdown_grace_s: float = 2.0
    model: ModelInfo = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.model = ModelInfo.read(self.model_path)
        for name in ("port", "dist_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 65535], got {value}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if self.dp_size < 1:
            raise ValueError(f"--dp-size must be >= 1 (attention workers), got {self.dp_size}")
        if self.ep_size < 1:
            raise ValueError(f"--ep-size must be >= 1 (expert workers), got {self.ep_size}")
        if self.ep_num_redundant_experts < 0:
            raise ValueError(f"--ep-num-redundant-experts must be >= 0, got {self.ep_num_redundant_experts}")
        if self.num_physical_slots % self.ep_size != 0:
            raise ValueError(
                f"{self.model.num_experts} experts + {self.ep_num_redundant_experts} redundant = "
                f"{self.num_physical_slots} slots do not split evenly over --ep-size {self.ep_size}; "
                f"choose --ep-num-redundant-experts so that (E + R) % ep_size == 0 "
                f"(e.g. {(-self.model.num_experts) % self.ep_size})")
        if self.moe_a2a_backend not in MOE_A2A_BACKENDS:
            raise ValueError(f"--moe-a2a-backend {self.moe_a2a_backend!r} is unknown; "
                             f"choose one of {', '.join(MOE_A2A_BACKENDS)}")
        if self.init_expert_location != "trivial" and not Path(self.init_expert_location).is_file():
            raise ValueError(f"--init-expert-location {self.init_expert_location!r} is neither 'trivial' "
                             "nor an existing snapshot file")
        if self.heartbeat_interval_ms <= 0:
            raise ValueError(f"--heartbeat-interval-ms must be > 0, got {self.heartbeat_interval_ms}")
        if self.heartbeat_timeout_ms <= 2 * self.heartbeat_interval_ms:
            raise ValueError(
                f"--heartbeat-timeout-ms ({self.heartbeat_timeout_ms}) must exceed two heartbeat intervals "
                f"({2 * self.heartbeat_interval_ms} ms): a worker is SUSPECT after 2 missed heartbeats "
                "and DEAD only after the timeout")
        if self.advertise_host is None:
            self.advertise_host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host

    @property
    def num_physical_slots(self) -> int:
        """P = E + R."""
        return self.model.num_experts + self.ep_num_redundant_experts

    @property
    def world_size(self) -> int:
        """D attention ranks [0, D) then N expert ranks [D, D + N)."""
        return self.dp_size + self.ep_size

    @property
    def suspect_after_ms(self) -> int:
        return 2 * self.heartbeat_interval_ms
