"""PlacementConfig: everything the placement service process is told, validated once.

Built by ``__main__.main`` from flags (and the environment, read only there); every object
of the service gets it through its constructor. ``__post_init__`` reads the model's
config.json (no weights) into ``model``, the ``ModelSpec`` the workers read (so placement refuses
the models they refuse), and checks that the deployment adds up, with
messages that say which flag to change.

``--moe-a2a-backend local`` is a colocated deployment: every attention worker holds all experts
itself, there are no expert workers (``--ep-size 0``, required) and no expert placement to keep
(no redundancy, no snapshot, no EPLB).

``--elastic-ep-backend`` (SGLang's flag): ``placement`` makes this service keep serving through
expert-worker losses (``failover.py``); ``mooncake`` does the same and is meant to drive Mooncake
EP's active-ranks mask, so it needs ``--moe-a2a-backend mooncake``. As in SGLang, elastic EP turns
``--eplb-algorithm auto`` into ``elasticity_aware``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from epserve.dummy_weights import check_load_format
from epserve.grpc_security import PLAINTEXT, Security
from epserve.model_config import ModelSpec, load_model_spec

MOE_A2A_BACKENDS = ("local", "torch", "cuda_ipc", "mooncake", "deepep")
EPLB_ALGORITHMS = ("auto", "deepseek", "deepseek_hierarchical", "elasticity_aware", "movement_aware")
ELASTIC_EP_BACKENDS = ("none", "placement", "mooncake")
ELASTIC_EPLB_ALGORITHMS = ("elasticity_aware", "movement_aware")   # the planners that honour lost workers
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass
class PlacementConfig:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    dp_size: int = 1  # A attention workers
    ep_size: int = 1  # W expert workers; 0 with moe_a2a_backend local (colocated)
    ep_num_redundant_experts: int = 0  # R
    init_expert_location: str = "trivial"  # "trivial" or a snapshot path (.json / .pt)
    moe_a2a_backend: str = "torch"
    dist_port: int = 0  # rendezvous store port, 0 = pick
    advertise_host: str | None = None  # None = host, or 127.0.0.1 when host is a wildcard
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_ms: int = 5000
    state_db: str | None = None  # SQLite path; None = in memory only
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = pick); None = no metrics
    otlp_endpoint: str = ""  # OTLP/gRPC collector for traces; "" = tracing off
    shutdown_grace_s: float = 2.0
    load_format: str = "auto"  # the workers' --load-format: dummy (random) weights have another fingerprint
    # -- EPLB and map changes (see docs/operations.md) --
    enable_eplb: bool = False  # rebalance automatically from reported load
    eplb_algorithm: str = "auto"  # EPLB_ALGORITHMS; auto = SGLang's rule
    eplb_rebalance_num_iterations: int = 1000  # forward passes between EPLB decisions
    eplb_rebalance_layers_per_chunk: int = 0  # layers per map version of one rebalance; 0 = all at once
    eplb_min_rebalancing_utilization_threshold: float = 1.0  # rebalance only below this balancedness
    eplb_min_gain: float = 0.05  # predicted gain needed for moving every slot (scaled by the share moved)
    eplb_prepare_timeout_s: float = 120.0  # expert workers must ack PREPARE within this
    eplb_commit_timeout_s: float = 30.0  # attention workers must switch (ack COMMIT) within this
    eplb_expert_dtype_bytes: int = 2  # bytes per expert weight element, for bytes_moved (2 = bf16)
    num_nodes: int = 1  # nodes the expert workers span (hierarchical planning)
    num_groups: int = 0  # expert groups (hierarchical planning); 0 = the model's (DeepSeek's n_group, else none)
    # -- elastic EP (see docs/operations.md, "When a worker dies") --
    elastic_ep_backend: str = "none"  # ELASTIC_EP_BACKENDS; none = a lost expert worker is not replaced
    elastic_ep_probe_timeout_ms: int = 500  # a suspect that does not accept a connection within this is DEAD
    security: Security = field(default=PLAINTEXT, repr=False)  # the deployment's token + TLS (grpc_security.py)
    max_message_bytes: int = 64 << 20  # largest gRPC message a caller may send (snapshots, load reports)
    model: ModelSpec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_load_format(self.load_format)
        self.model = load_model_spec(self.model_path, self.load_format)
        if not self.model.moe_layers:
            raise ValueError(f"{self.model_path}/config.json describes no MoE layers (check decoder_sparse_step, "
                             "mlp_only_layers / first_k_dense_replace); placement needs at least one")
        if not self.num_groups:
            self.num_groups = self.model.num_expert_groups
        for name in ("port", "dist_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 65535], got {value}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if self.max_message_bytes < 1 << 20:
            raise ValueError(f"--max-message-bytes must be >= 1 MiB (expert maps and load reports), got "
                             f"{self.max_message_bytes}")
        if self.dp_size < 1:
            raise ValueError(f"--dp-size must be >= 1 (attention workers), got {self.dp_size}")
        if self.moe_a2a_backend not in MOE_A2A_BACKENDS:
            raise ValueError(f"--moe-a2a-backend {self.moe_a2a_backend!r} is unknown; "
                             f"choose one of {', '.join(MOE_A2A_BACKENDS)}")
        if self.colocated:
            self._check_colocated()
        elif self.ep_size < 1:
            raise ValueError(f"--ep-size must be >= 1 (expert workers), got {self.ep_size}"
                             + ("; --ep-size 0 (no expert workers) needs --moe-a2a-backend local" if self.ep_size == 0
                                else ""))
        if self.ep_num_redundant_experts < 0:
            raise ValueError(f"--ep-num-redundant-experts must be >= 0, got {self.ep_num_redundant_experts}")
        if not self.colocated and self.num_physical_slots % self.ep_size != 0:
            raise ValueError(
                f"{self.model.num_experts} experts + {self.ep_num_redundant_experts} redundant = "
                f"{self.num_physical_slots} slots do not split evenly over --ep-size {self.ep_size}; "
                f"choose --ep-num-redundant-experts so that (E + R) % ep_size == 0 "
                f"(e.g. {(-self.model.num_experts) % self.ep_size})")
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
        self._check_eplb()
        self._check_elastic()
        if self.advertise_host is None:
            self.advertise_host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host

    def _check_colocated(self) -> None:
        reason = "with --moe-a2a-backend local every attention worker holds all experts itself (no expert workers)"
        if self.ep_size != 0:
            raise ValueError(f"--ep-size {self.ep_size}: {reason}; set --ep-size 0, or choose another "
                             "--moe-a2a-backend (e.g. torch) to run expert workers")
        if self.ep_num_redundant_experts:
            raise ValueError(f"--ep-num-redundant-experts {self.ep_num_redundant_experts}: {reason}, one copy of "
                             "each; set it to 0")
        if self.init_expert_location != "trivial":
            raise ValueError(f"--init-expert-location {self.init_expert_location!r}: {reason}, in the trivial "
                             "placement; leave it at trivial")
        if self.enable_eplb:
            raise ValueError(f"--enable-eplb: {reason}, so there is no expert placement to rebalance; drop the flag")

    def _check_elastic(self) -> None:
        if self.elastic_ep_backend not in ELASTIC_EP_BACKENDS:
            raise ValueError(f"--elastic-ep-backend {self.elastic_ep_backend!r} is unknown; choose one of "
                             f"{', '.join(ELASTIC_EP_BACKENDS)}")
        if self.elastic_ep_probe_timeout_ms <= 0:
            raise ValueError(f"--elastic-ep-probe-timeout-ms must be > 0, got {self.elastic_ep_probe_timeout_ms}")
        if not self.elastic:
            return
        if self.colocated:
            raise ValueError(f"--elastic-ep-backend {self.elastic_ep_backend}: a colocated deployment "
                             "(--moe-a2a-backend local) has no expert workers to lose; use --elastic-ep-backend none")
        if self.elastic_ep_backend == "mooncake" and self.moe_a2a_backend != "mooncake":
            raise ValueError("--elastic-ep-backend mooncake drives Mooncake EP's active-ranks mask and needs "
                             f"--moe-a2a-backend mooncake (got {self.moe_a2a_backend}); with other data planes use "
                             "--elastic-ep-backend placement")
        if self.eplb_algorithm == "auto":
            self.eplb_algorithm = "elasticity_aware"
        elif self.eplb_algorithm not in ELASTIC_EPLB_ALGORITHMS:
            raise ValueError(f"--elastic-ep-backend {self.elastic_ep_backend} needs an EPLB algorithm that places "
                             f"nothing on lost workers: --eplb-algorithm auto (= elasticity_aware) or one of "
                             f"{', '.join(ELASTIC_EPLB_ALGORITHMS)}, not {self.eplb_algorithm}")

    def _check_eplb(self) -> None:
        if self.eplb_algorithm not in EPLB_ALGORITHMS:
            raise ValueError(f"--eplb-algorithm {self.eplb_algorithm!r} is unknown; choose one of "
                             f"{', '.join(EPLB_ALGORITHMS)}")
        if self.eplb_rebalance_num_iterations < 1:
            raise ValueError(f"--eplb-rebalance-num-iterations must be >= 1, got {self.eplb_rebalance_num_iterations}")
        if self.eplb_rebalance_layers_per_chunk < 0:
            raise ValueError("--eplb-rebalance-layers-per-chunk must be >= 0 (0 = all layers at once), got "
                             f"{self.eplb_rebalance_layers_per_chunk}")
        if not 0.0 <= self.eplb_min_rebalancing_utilization_threshold <= 1.0:
            raise ValueError("--eplb-min-rebalancing-utilization-threshold must be in [0, 1], got "
                             f"{self.eplb_min_rebalancing_utilization_threshold}")
        if self.eplb_min_gain < 0:
            raise ValueError(f"--eplb-min-gain must be >= 0, got {self.eplb_min_gain}")
        for name in ("eplb_prepare_timeout_s", "eplb_commit_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.eplb_expert_dtype_bytes not in (1, 2, 4, 8):
            raise ValueError(f"--eplb-expert-dtype-bytes must be 1, 2, 4 or 8, got {self.eplb_expert_dtype_bytes}")
        if self.num_nodes < 1 or self.ep_size % self.num_nodes != 0:
            raise ValueError(f"--num-nodes must be >= 1 and divide --ep-size {self.ep_size}, got {self.num_nodes}")
        if self.num_groups < 0 or (self.num_groups and self.model.num_experts % self.num_groups != 0):
            raise ValueError(f"--num-groups must be 0 (none) or divide the {self.model.num_experts} experts, "
                             f"got {self.num_groups}")

    @property
    def elastic(self) -> bool:
        """Elastic EP: survive expert-worker losses (``--elastic-ep-backend`` placement or mooncake)."""
        return self.elastic_ep_backend != "none"

    @property
    def colocated(self) -> bool:
        """``--moe-a2a-backend local``: no expert workers, no expert map in placement."""
        return self.moe_a2a_backend == "local"

    @property
    def num_physical_slots(self) -> int:
        """P = E + R."""
        return self.model.num_experts + self.ep_num_redundant_experts

    @property
    def world_size(self) -> int:
        """A attention ranks [0, A) then W expert ranks [A, A + W)."""
        return self.dp_size + self.ep_size

    @property
    def suspect_after_ms(self) -> int:
        return 2 * self.heartbeat_interval_ms
