"""What a deployment is made of (``DeploymentConfig``): its processes, their devices and flags, checked
before anything starts; ``attention_args``/``expert_args`` are the command lines the launcher
(``epserve/deployment.py``) gives them.

Telemetry: ``otlp_endpoint`` is passed to every child as ``--otlp-endpoint``; with ``metrics``
every child gets ``--metrics-port 0`` (a free port) and prints ``METRICS_PORT=<port>`` before
its own port line; ``metrics_endpoints`` maps child name → ``host:port`` of its ``/metrics``.
``enable_expert_distribution_metrics`` (needs ``metrics``) adds the attention workers' per-expert-
worker load series; ``expert_distribution_recorder_mode`` / ``expert_distribution_dir`` go to
the attention workers, which also inherit this process's environment (e.g.
``EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL``).

``load_format`` (``--load-format``) goes to every worker and to placement, which accepts only
workers whose weights match it (dummy weights have their own model fingerprint).

Devices (hybrid deployments): attention workers run on ``attention_device`` and expert worker i on
``expert_devices[i]`` (both default to ``device``), so a GPU attention worker can use GPU and CPU
expert workers; the torch data plane then runs on gloo through host memory. Expert worker i
registers ``expert_capacities[i]`` with placement; with ``expert_capacities`` "auto" (``epserve up``'s
default) each measures its own (``--capacity auto``, expert_worker/capacity.py), with None each
registers the worker's default, 1 (placement then keeps the trivial first map: tests rely on a
known map, and measured figures of equal workers differ by noise); ``expert_num_threads[i]`` sets
its torch threads.

Colocated (``moe_a2a_backend`` local): no expert workers (``num_expert_workers`` 0, placement
``--ep-size 0``); every attention worker holds all experts and runs them with
``moe_runner_backend``; readiness waits for the attention workers and the gateway only. The
engine flags (``attention_backend``, ``cuda_graph_max_bs``, ``disable_cuda_graph``,
``disable_overlap_schedule`` and the sizes) go to the attention workers; None = the worker's default.

"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from epserve.grpc_security import Security, read_token_file
from epserve.supervisor import RestartPolicy

# epserve.dummy_weights.LOAD_FORMATS (not imported: that module pulls torch into the launcher)
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# The attention worker's --attention-backend choices (EngineLimits also names flashinfer, not built)
ATTENTION_BACKENDS = ("auto", "triton", "torch_native")
COLOCATED = "local"        # the --moe-a2a-backend of a colocated deployment
AUTO_CAPACITY = "auto"     # expert_capacities: every expert worker measures its own (--capacity auto)


@dataclass
class DeploymentConfig:
    model_path: str
    num_attention_workers: int = 1
    num_expert_workers: int | None = None   # None = 1, or 0 for a colocated deployment (the only value it takes)
    num_redundant_experts: int = 0
    dtype: str = "bfloat16"
    device: str = "cpu"                     # every worker's, unless attention_device / expert_devices say otherwise
    attention_device: str = ""              # "" = device
    expert_devices: list[str] | None = None         # one per expert worker; None = device for each
    expert_capacities: list[float] | str | None = None  # one per expert worker; "auto" = each measures its own
                                                        # (epserve up's default); None = the workers' default (1)
    expert_num_threads: list[int] | None = None     # one per expert worker; None = the worker's default (1)
    load_format: str = "auto"               # every worker's --load-format; dummy = random weights
    host: str = "127.0.0.1"
    gateway_port: int = 0
    placement_port: int = 0
    moe_a2a_backend: str = "torch"          # local = colocated: attention workers hold every expert
    moe_runner_backend: str = "auto"        # expert kernels: the expert workers', or colocated the attention workers'
    ep_dispatch_algorithm: str = "dynamic"
    init_expert_location: str = "trivial"
    state_db: str = ""
    otlp_endpoint: str = ""
    metrics: bool = False
    enable_expert_distribution_metrics: bool = False    # attention workers' expert-load series (needs metrics)
    expert_distribution_recorder_mode: str = "stat"     # stat | per_pass | per_token
    expert_distribution_dir: str = ""                   # heatmap files; empty = the workers' default
    log_dir: str = ""                       # per-process log files; empty = inherit stderr
    # -- attention workers' engine (SGLang's flag names); None = the worker's default --
    attention_backend: str = "auto"         # auto | triton | torch_native
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False
    max_running_requests: int | None = None
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int | None = None
    context_length: int | None = None       # 0 = the model's
    num_micro_batches: int | None = None    # 1 | 2; None: the worker's (2 on the CPU runner, 1 on the GPU step path)
    extra_placement_args: list[str] = field(default_factory=list)
    extra_attention_args: list[str] = field(default_factory=list)
    extra_expert_args: list[str] = field(default_factory=list)
    extra_gateway_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 180.0
    # -- security (grpc_security.py): the token's 0600 file and TLS files every child gets --
    auth_token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # -- supervision (wait): restarts per child within the window; 0 = a death ends the deployment --
    max_restarts: int = 5
    restart_window_s: float = 600.0

    def __post_init__(self) -> None:
        if self.num_attention_workers < 1:
            raise ValueError(f"--attention-workers must be >= 1, got {self.num_attention_workers}")
        if self.colocated:
            self._check_colocated()
        elif self.num_expert_workers is None:
            self.num_expert_workers = 1
        elif self.num_expert_workers < 1:
            raise ValueError(f"--expert-workers (--ep-size) must be >= 1, got {self.num_expert_workers} (for "
                             f"no expert workers: --moe-a2a-backend {COLOCATED}, every attention worker holds all "
                             "experts)")
        if self.num_redundant_experts < 0:
            raise ValueError("--ep-num-redundant-experts must be >= 0")
        self._check_engine()
        self._check_devices()
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"--load-format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.enable_expert_distribution_metrics and not self.metrics:
            raise ValueError("--enable-expert-distribution-metrics adds series to the attention workers' /metrics, "
                             "which is off: add --metrics")
        if self.expert_distribution_recorder_mode not in ("stat", "per_pass", "per_token"):
            raise ValueError("--expert-distribution-recorder-mode must be stat, per_pass or per_token, got "
                             f"{self.expert_distribution_recorder_mode!r}")
        token = read_token_file(self.auth_token_file) if self.auth_token_file else ""
        self.security = Security(token, self.tls_cert, self.tls_key, self.tls_ca)     # ValueError naming the flag
        self.restart_policy = RestartPolicy(self.max_restarts, self.restart_window_s)

    def _check_colocated(self) -> None:
        reason = (f"with --moe-a2a-backend {COLOCATED} every attention worker holds all experts itself (no expert "
                  "workers)")
        if self.num_expert_workers:
            raise ValueError(f"--expert-workers (--ep-size) {self.num_expert_workers}: {reason}; leave it out (or "
                             "set it to 0), or choose --moe-a2a-backend torch to run expert workers")
        self.num_expert_workers = 0
        if self.num_redundant_experts:
            raise ValueError(f"--ep-num-redundant-experts {self.num_redundant_experts}: {reason}, one copy of "
                             "each; leave it at 0")
        if self.init_expert_location != "trivial":
            raise ValueError(f"--init-expert-location {self.init_expert_location!r}: {reason}, in the trivial "
                             "placement; leave it at trivial")
        if self.extra_expert_args:
            raise ValueError(f"expert worker flags {self.extra_expert_args}: {reason}")

    def _check_devices(self) -> None:
        """Hybrid deployments: a device (and capacity, threads) per expert worker; flags named in errors."""
        for flag, value in (("--device", self.device), ("--attention-device", self.attention_device or self.device)):
            check_device(flag, value)
        capacities = None if isinstance(self.expert_capacities, str) else self.expert_capacities
        per_worker = (("--expert-devices", self.expert_devices), ("--expert-capacities", capacities),
                      ("--expert-num-threads", self.expert_num_threads))
        for flag, values in per_worker:
            if values is None:
                continue
            if self.colocated:
                raise ValueError(f"{flag}: with --moe-a2a-backend {COLOCATED} there are no expert workers; drop the "
                                 "flag (the attention workers run the experts on --attention-device)")
            if len(values) != self.num_expert_workers:
                raise ValueError(f"{flag} has {len(values)} entries, there are {self.num_expert_workers} expert "
                                 f"workers (--expert-workers): give one per expert worker")
        for device in self.expert_devices or ():
            check_device("--expert-devices", device)
        if isinstance(self.expert_capacities, str):
            if self.expert_capacities != AUTO_CAPACITY:
                raise ValueError(f"--expert-capacities must be numbers, one per expert worker, or {AUTO_CAPACITY}; "
                                 f"got {self.expert_capacities!r}")
        for capacity in () if isinstance(self.expert_capacities, str) else self.expert_capacities or ():
            if not (math.isfinite(capacity) and capacity > 0):
                raise ValueError(f"--expert-capacities entries must be numbers > 0, got {capacity}")
        for threads in self.expert_num_threads or ():
            if threads < 1:
                raise ValueError(f"--expert-num-threads entries must be >= 1, got {threads}")
        devices = set(self.process_devices())
        if self.moe_a2a_backend == "cuda_ipc" and len({d.split(":")[0] for d in devices}) > 1:
            raise ValueError(f"--moe-a2a-backend cuda_ipc puts every channel on one kind of device, but the "
                             f"workers are on {sorted(devices)}: use --moe-a2a-backend torch (gloo through host "
                             "memory) for a deployment that mixes CPU and GPU workers")

    def process_devices(self) -> list[str]:
        """The torch device of every worker process: the attention workers', then each expert worker's."""
        attention = [self.attention_device or self.device] * self.num_attention_workers
        return attention + [self.expert_device(i) for i in range(self.num_expert_workers or 0)]

    def expert_device(self, index: int) -> str:
        return self.expert_devices[index] if self.expert_devices else self.device

    def expert_args(self, index: int) -> list[str]:
        """Flags of expert worker ``index`` besides the common ones: its device, capacity, threads."""
        args = ["--device", self.expert_device(index),
                "--moe-runner-backend", self.moe_runner_backend]
        if self.expert_capacities == AUTO_CAPACITY:
            args += ["--capacity", AUTO_CAPACITY]
        elif self.expert_capacities is not None:
            args += ["--capacity", repr(float(self.expert_capacities[index]))]
        if self.expert_num_threads:
            args += ["--num-threads", str(self.expert_num_threads[index])]
        return args + self.extra_expert_args

    def _check_engine(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 0:
            raise ValueError(f"--cuda-graph-max-bs must be >= 0, got {self.cuda_graph_max_bs}")
        for flag, value in (("--max-running-requests", self.max_running_requests),
                            ("--num-kv-blocks", self.num_kv_blocks),
                            ("--max-num-batched-tokens", self.max_num_batched_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.context_length is not None and self.context_length < 0:
            raise ValueError(f"--context-length must be >= 0 (0 = the model's), got {self.context_length}")

    @property
    def colocated(self) -> bool:
        return self.moe_a2a_backend == COLOCATED

    def attention_args(self) -> list[str]:
        """Flags every attention worker gets besides the common ones."""
        args = ["--device", self.attention_device or self.device, "--moe-a2a-backend", self.moe_a2a_backend,
                "--ep-dispatch-algorithm", self.ep_dispatch_algorithm,
                "--expert-distribution-recorder-mode", self.expert_distribution_recorder_mode,
                "--attention-backend", self.attention_backend]
        if self.colocated:
            args += ["--moe-runner-backend", self.moe_runner_backend]
        if self.disable_cuda_graph:
            args.append("--disable-cuda-graph")
        if self.disable_overlap_schedule:
            args.append("--disable-overlap-schedule")
        for flag, value in (("--cuda-graph-max-bs", self.cuda_graph_max_bs),
                            ("--max-running-requests", self.max_running_requests),
                            ("--num-kv-blocks", self.num_kv_blocks),
                            ("--max-num-batched-tokens", self.max_num_batched_tokens),
                            ("--context-length", self.context_length),
                            ("--num-micro-batches", self.num_micro_batches)):
            if value is not None:
                args += [flag, str(value)]
        if self.enable_expert_distribution_metrics:
            args.append("--enable-expert-distribution-metrics")
        if self.expert_distribution_dir:
            args += ["--expert-distribution-dir", self.expert_distribution_dir]
        return args + self.extra_attention_args



def check_device(flag: str, device: str) -> None:
    """ValueError naming ``flag`` unless ``device`` reads as a torch device: cpu, cuda or cuda:N."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ValueError(f"{flag}: {device!r} is not a device; use cpu, cuda or cuda:N")
