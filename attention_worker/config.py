"""The attention worker's one config dataclass, built from flags (and environment) in ``main()``."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from epserve.attention_worker.engine import EngineLimits
from epserve.attention_worker.expert_routing import DispatchAlgorithm
from epserve.dataplane import BACKENDS as MOE_A2A_BACKENDS
from epserve.grpc_security import PLAINTEXT, Security
from epserve.process_flags import check_worker_config

HEATMAP_ENV = ("EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL", "SGLANG_EPLB_HEATMAP_COLLECTION_INTERVAL")


def default_expert_distribution_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "epserve_expert_distribution")


def heatmap_interval_from_env(environ: Mapping[str, str]) -> int:
    """Passes per heatmap interval from ``EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL``, else SGLang's
    ``SGLANG_EPLB_HEATMAP_COLLECTION_INTERVAL``; unset or empty = 0 (off). ValueError naming the
    variable for a value that is not an integer >= 0. Called once, in ``main()``."""
    for name in HEATMAP_ENV:
        text = environ.get(name, "").strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not an integer: set it to N > 0 for a heatmap every N forward "
                             "passes, or 0 / unset for none") from None
        if value < 0:
            raise ValueError(f"{name}={value} is negative: set it to N > 0 for a heatmap every N forward passes, "
                             "or 0 / unset for none")
        return value
    return 0


def check_engine_limits(limits: EngineLimits, max_context: int) -> None:
    """ValueError naming the flag for engine sizes ``EngineLimits`` does not check itself
    (it checks --attention-backend and --cuda-graph-max-bs). ``max_context``: --context-length,
    0 = the model's."""
    if limits.kv_block_size < 1 or limits.num_kv_blocks < 1:
        raise ValueError(f"--kv-block-size and --num-kv-blocks must be >= 1, got {limits.kv_block_size} and "
                         f"{limits.num_kv_blocks}")
    if limits.max_num_batched_tokens < 1:
        raise ValueError(f"--max-num-batched-tokens must be >= 1, got {limits.max_num_batched_tokens}")
    if limits.max_num_seqs < 1:
        raise ValueError(f"--max-running-requests must be >= 1, got {limits.max_num_seqs}")
    if limits.num_micro_batches not in (None, 1, 2):
        raise ValueError(f"--num-micro-batches must be 1 or 2, got {limits.num_micro_batches}")
    if max_context < 0:
        raise ValueError(f"--context-length must be >= 0 (0 = the model's), got {max_context}")


@dataclass
class AttentionWorkerConfig:
    model_path: str
    placement: str                          # host:port of the placement service
    host: str = "127.0.0.1"
    port: int = 0                           # 0 = pick a free port
    advertise_host: str = ""                # how others reach this worker; default: host
    worker_id: str = ""                     # "" = generated: attn-<hostname>-<6 hex digits>
    dtype: str = "bfloat16"
    device: str = "cpu"
    load_format: str = "auto"               # auto | safetensors | dummy (random weights, no checkpoint read)
    moe_a2a_backend: str = "torch"          # local: all experts in this process (colocated); else expert workers
    moe_runner_backend: str = "auto"        # expert kernels; used by local only (expert workers run the others)
    limits: EngineLimits = field(default_factory=EngineLimits)
    max_context: int = 0                    # 0 = the model's max_position_embeddings
    ep_dispatch_algorithm: str = "dynamic"
    expert_distribution_recorder_mode: str = "stat"
    enable_expert_distribution_metrics: bool = False    # per-expert-worker load series on /metrics
    expert_distribution_dir: str = field(default_factory=default_expert_distribution_dir)  # heatmap files
    eplb_heatmap_collection_interval: int = 0           # heatmap every N passes; 0 = off (from the env)
    gpu_two_micro_batches: bool = False     # EPSERVE_GPU_TWO_MICRO_BATCHES=1: try 2 on the GPU step path (env)
    load_report_interval_s: float = 2.0     # how often expert load goes to placement
    dataplane_timeout_s: float = 30.0
    elastic_ep_recovery_timeout_s: float = 60.0   # elastic EP: how long an interrupted MoE layer waits for a map
    rpc_timeout_s: float = 10.0
    num_threads: int = 1
    metrics_port: int | None = None         # Prometheus /metrics; None = off, 0 = a free port
    otlp_endpoint: str = ""                 # OTLP gRPC collector HOST:PORT; "" = no tracing
    trace_step_every: int = 16              # per-step spans on steps 0, N, 2N, ...; 0 = never
    max_queued_requests: int = 256          # requests waiting beyond --max-running-requests; more: RESOURCE_EXHAUSTED
    stream_interval: int = 1                # tokens per streamed message at least (the last one may hold fewer)
    max_message_bytes: int = 16 << 20       # largest gRPC message a caller may send
    security: Security = field(default=PLAINTEXT, repr=False)   # the deployment's token + TLS

    def __post_init__(self) -> None:
        check_worker_config(self, "attn")
        if self.moe_a2a_backend not in MOE_A2A_BACKENDS:
            raise ValueError(f"--moe-a2a-backend must be one of {MOE_A2A_BACKENDS}, got {self.moe_a2a_backend!r}")
        try:
            DispatchAlgorithm(self.ep_dispatch_algorithm)
        except ValueError:
            raise ValueError(f"--ep-dispatch-algorithm must be one of "
                             f"{[a.value for a in DispatchAlgorithm]}, got {self.ep_dispatch_algorithm!r}") from None
        if self.expert_distribution_recorder_mode not in ("stat", "per_pass", "per_token"):
            raise ValueError("--expert-distribution-recorder-mode must be stat, per_pass or per_token, got "
                             f"{self.expert_distribution_recorder_mode!r}")
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {self.stream_interval}")
        if self.load_report_interval_s <= 0:
            raise ValueError(f"--load-report-interval-s must be > 0, got {self.load_report_interval_s}")
        if self.dataplane_timeout_s <= 0 or self.rpc_timeout_s <= 0:
            raise ValueError("--dataplane-timeout-s and --rpc-timeout-s must be > 0")
        if self.elastic_ep_recovery_timeout_s <= 0:
            raise ValueError(f"--elastic-ep-recovery-timeout-s must be > 0, got {self.elastic_ep_recovery_timeout_s}")
        check_engine_limits(self.limits, self.max_context)
        if self.enable_expert_distribution_metrics and self.metrics_port is None:
            raise ValueError("--enable-expert-distribution-metrics adds series to /metrics, which is off: add "
                             "--metrics-port N (0 = a free port)")
        if self.eplb_heatmap_collection_interval < 0:
            raise ValueError(f"{HEATMAP_ENV[0]} must be >= 0 (0 = off), got {self.eplb_heatmap_collection_interval}")
        if self.eplb_heatmap_collection_interval and not self.expert_distribution_dir:
            raise ValueError("--expert-distribution-dir is empty: the heatmap needs a directory to write to")
        if self.max_queued_requests < 0:
            raise ValueError(f"--max-queued-requests must be >= 0, got {self.max_queued_requests}")
        if self.max_message_bytes < 1 << 20:
            raise ValueError(f"--max-message-bytes must be >= 1 MiB, got {self.max_message_bytes}")
        if self.trace_step_every < 0:
            raise ValueError(f"--trace-step-every must be >= 0 (0 = no per-step spans), got {self.trace_step_every}")

    @property
    def colocated(self) -> bool:
        """``--moe-a2a-backend local``: this worker holds every expert; the deployment has no expert workers."""
        return self.moe_a2a_backend == "local"

    @property
    def track_expert_passes(self) -> bool:
        """Whether the recorder keeps each pass's counts: the metrics or the heatmap read them."""
        return self.enable_expert_distribution_metrics or self.eplb_heatmap_collection_interval > 0
