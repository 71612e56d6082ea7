"""A whole deployment as local processes: what ``epserve up`` (and end-to-end tests) start.

Order: placement service → expert workers (none when colocated) → attention workers → gateway. Each child prints
``NAME_PORT=<port>`` on stdout when bound; its stderr goes to our stderr (or a log file).
Readiness = placement lists every worker ALIVE and the gateway's health says SERVING.
Children are placed in their own process group and asked to die with this process
(PR_SET_PDEATHSIG), so neither Ctrl-C nor a crash of the launcher leaves one behind.

Telemetry: ``otlp_endpoint`` is passed to every child as ``--otlp-endpoint``; with ``metrics``
every child gets ``--metrics-port 0`` (a free port) and prints ``METRICS_PORT=<port>`` before
its own port line; ``metrics_endpoints`` maps child name → ``host:port`` of its ``/metrics``.
``enable_expert_distribution_metrics`` (needs ``metrics``) adds the attention workers' per-expert-
worker load series; ``expert_distribution_recorder_mode`` / ``expert_distribution_dir`` go to
the attention workers, which also inherit this process's environment (e.g.
``EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL``).

``load_format`` (``--load-format``) goes to every worker and to placement, which accepts only
workers whose weights match it (dummy weights have their own model fingerprint).

Security: with ``auth_token_file`` every child gets ``--auth-token-file`` (never the token itself on
a command line) and the TLS files; ``security`` is what this launcher uses to check readiness.

Supervision (``wait``): a child that dies is started again with the same flags (placement and the
gateway on the ports they had, so clients and workers find them again; placement resumes from
``state_db``), after a backoff, at most ``max_restarts`` times within ``restart_window_s``
(``supervisor.py``). A worker given up on is left down while the rest serve; placement or the
gateway given up on ends the deployment. ``max_restarts`` 0: the first death ends it. Failures
quote the child's own last error line (its stderr is read through ``supervisor.ChildLog``).

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
engine flags (``attention_backend``, ``cuda_graph_max_bs``, ``disable_cuda_graph`` and the sizes)
go to the attention workers; None = the worker's default.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.grpc_security import Security, open_channel, read_token_file, security_args
from epserve.protos import placement_pb2, placement_pb2_grpc
from epserve.supervisor import ChildLog, RestartMetrics, RestartPolicy, RestartState

logger = logging.getLogger(__name__)

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
    max_running_requests: int | None = None
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int | None = None
    context_length: int | None = None       # 0 = the model's
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
        devices = {self.attention_device or self.device, *(self.expert_devices or [self.device])}
        if self.moe_a2a_backend == "cuda_ipc" and len({d.split(":")[0] for d in devices}) > 1:
            raise ValueError(f"--moe-a2a-backend cuda_ipc puts every channel on one kind of device, but the "
                             f"workers are on {sorted(devices)}: use --moe-a2a-backend torch (gloo through host "
                             "memory) for a deployment that mixes CPU and GPU workers")

    def expert_args(self, index: int) -> list[str]:
        """Flags of expert worker ``index`` besides the common ones: its device, capacity, threads."""
        args = ["--device", self.expert_devices[index] if self.expert_devices else self.device,
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
        for flag, value in (("--cuda-graph-max-bs", self.cuda_graph_max_bs),
                            ("--max-running-requests", self.max_running_requests),
                            ("--num-kv-blocks", self.num_kv_blocks),
                            ("--max-num-batched-tokens", self.max_num_batched_tokens),
                            ("--context-length", self.context_length)):
            if value is not None:
                args += [flag, str(value)]
        if self.enable_expert_distribution_metrics:
            args.append("--enable-expert-distribution-metrics")
        if self.expert_distribution_dir:
            args += ["--expert-distribution-dir", self.expert_distribution_dir]
        return args + self.extra_attention_args


# Runs first in every child (``python -c _CHILD_PRELUDE LAUNCHER_PID MODULE ARGS...``): its own process
# group, SIGTERM when the launcher dies (PR_SET_PDEATHSIG; exits at once if the launcher is already
# gone), then the module's ``__main__``. Done in the child rather than in a ``preexec_fn`` so that
# Popen can use vfork: a plain fork() runs gRPC's fork handlers in the launcher, and while gRPC
# threads are busy there (e.g. a test's in-process OTLP receiver) a child could abort before exec.
_CHILD_PRELUDE = """\
import ctypes, os, runpy, signal, sys
os.setpgrp()
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
except OSError:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("epserve: the launcher is gone")
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@dataclass(eq=False)             # an entity: compared by identity
class Child:
    name: str
    process: subprocess.Popen
    port: int = 0
    metrics_port: int = 0                   # 0 = no metrics endpoint announced
    module: str = ""                        # what it runs, to start it again
    args: list[str] = field(default_factory=list)
    port_key: str = ""                      # its NAME_PORT= line
    log: ChildLog | None = None

    def error_line(self, wait_s: float = 0.0, strict: bool = False) -> str:
        """Its last error line on stderr (after up to ``wait_s`` for the rest of its output); with
        ``strict`` "" rather than a last line that does not read like an error."""
        if self.log is None:
            return ""
        if wait_s:
            self.log.wait_closed(wait_s)
        return self.log.error_line(strict)

    def describe_exit(self, code: int) -> str:
        if code < 0:
            how = f"was killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else \
                f"was killed by signal {-code}"
            line = self.error_line(wait_s=2.0, strict=True)
        else:
            how, line = f"exited with code {code}", self.error_line(wait_s=2.0)
        return f"{self.name} {how}" + (f": {line}" if line else "")


class LocalDeployment:
    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self.placement_port = 0
        self.gateway_port = 0
        self.restart_metrics = RestartMetrics()
        self.num_restarts: dict[str, int] = {}        # child name → restarts so far
        self._restarts: dict[str, RestartState] = {}
        self._lock = threading.Lock()        # children list: the supervisor and port readers change it

    # -- start ---------------------------------------------------------------------------
    def start(self) -> None:
        c = self.config
        try:
            placement_args = ["--dp-size", str(c.num_attention_workers), "--ep-size", str(c.num_expert_workers),
                              "--ep-num-redundant-experts", str(c.num_redundant_experts),
                              "--moe-a2a-backend", c.moe_a2a_backend,
                              "--init-expert-location", c.init_expert_location, "--port", str(c.placement_port),
                              "--load-format", c.load_format]
            if c.state_db:
                placement_args += ["--state-db", c.state_db]
            placement = self._spawn("placement", "epserve.placement_service", placement_args + c.extra_placement_args,
                                    "PLACEMENT_PORT")
            _set_flag(placement.args, "--port", str(placement.port))    # a restart binds the same port
            self.placement_port = placement.port
            address = f"{c.host}:{self.placement_port}"
            common = ["--placement", address, "--dtype", c.dtype, "--load-format", c.load_format]
            # Workers and gateway start in parallel: each imports torch for seconds.
            pending = [self._launch(f"expert-{i}", "epserve.expert_worker",
                                    common + ["--worker-id", f"expert-{i}"] + c.expert_args(i))
                       for i in range(c.num_expert_workers)]
            pending += [self._launch(f"attention-{i}", "epserve.attention_worker",
                                     common + ["--worker-id", f"attention-{i}"] + c.attention_args())
                        for i in range(c.num_attention_workers)]
            gateway = self._launch("gateway", "epserve.gateway", ["--placement", address, "--port", str(c.gateway_port)]
                                   + c.extra_gateway_args)
            for child in pending:
                self._await_port(child, "EXPERT_WORKER_PORT" if child.name.startswith("expert")
                                 else "ATTENTION_WORKER_PORT")
            self._await_port(gateway, "GATEWAY_PORT")
            self.gateway_port = gateway.port
            _set_flag(gateway.args, "--port", str(gateway.port))
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, module: str, args: list[str], port_key: str) -> Child:
        child = self._launch(name, module, args)
        self._await_port(child, port_key)
        return child

    def _launch(self, name: str, module: str, args: list[str]) -> Child:
        child = self._start_process(Child(name, None, module=module, args=list(args)))  # type: ignore[arg-type]
        with self._lock:
            self.children.append(child)
        return child

    def _start_process(self, child: Child) -> Child:
        """Starts ``child.module`` with ``child.args`` (and the flags every child gets) as ``child.process``."""
        c = self.config
        cmd = [sys.executable, "-c", _CHILD_PRELUDE, str(os.getpid()), child.module, "--model-path", c.model_path,
               "--host", c.host, *child.args, *security_args(c.security, c.auth_token_file)]
        if c.otlp_endpoint:
            cmd += ["--otlp-endpoint", c.otlp_endpoint]
        if c.metrics:
            cmd += ["--metrics-port", "0"]
        sink = None
        if c.log_dir:
            Path(c.log_dir).mkdir(parents=True, exist_ok=True)
            sink = open(Path(c.log_dir) / f"{child.name}.log", "a")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        child.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                         errors="replace")
        child.log = ChildLog(child.name, child.process.stderr, sink)
        child.port = child.metrics_port = 0
        self.restart_metrics.up.labels(child=child.name).set(1)
        return child

    def _await_port(self, child: Child, port_key: str) -> None:
        child.port_key = port_key
        child.port = self._read_port(child, port_key)
        threading.Thread(target=self._drain, args=(child,), daemon=True).start()
        logger.info("started %s (pid %d) on port %d", child.name, child.process.pid, child.port)

    def _read_port(self, child: Child, key: str, timeout_s: float = 120.0) -> int:
        """The ``KEY=<port>`` line's port; a ``METRICS_PORT=`` line before it sets ``child.metrics_port``."""
        result: list[int] = []

        def read() -> None:
            for line in child.process.stdout:
                if line.startswith("METRICS_PORT="):
                    child.metrics_port = int(line.strip().split("=", 1)[1])
                elif line.startswith(f"{key}="):
                    result.append(int(line.strip().split("=", 1)[1]))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not result:
            code = child.process.poll()
            if code is not None:
                raise RuntimeError(f"{child.describe_exit(code)} (before reporting its port)")
            line = child.error_line()
            raise RuntimeError(f"{child.name} did not report its port within {timeout_s:.0f}s"
                               + (f"; its last error: {line}" if line else ""))
        return result[0]

    @staticmethod
    def _drain(child: Child) -> None:
        for _ in child.process.stdout:
            pass

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        channel = open_channel(f"{self.config.host}:{self.placement_port}", self.config.security)
        admin = placement_pb2_grpc.PlacementAdminStub(channel)
        expected = self.config.num_attention_workers + self.config.num_expert_workers
        gateway = open_channel(f"{self.config.host}:{self.gateway_port}", self.config.security)
        health = health_pb2_grpc.HealthStub(gateway)
        try:
            while True:
                self._check_alive()
                try:
                    workers = admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=2).workers
                    alive = sum(w.state == placement_pb2.WORKER_STATE_ALIVE for w in workers)
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if alive == expected and status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                        raise RuntimeError(f"placement refused this launcher's token: {exc.details()}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"deployment not ready after {self.config.startup_timeout_s:.0f}s")
                time.sleep(0.2)
        finally:
            channel.close()
            gateway.close()

    def _check_alive(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise RuntimeError(f"{child.describe_exit(code)} during start-up")

    # -- run / supervise / stop ----------------------------------------------------------
    def wait(self, stop: threading.Event) -> int:
        """Supervise until ``stop`` is set: restart children that die (module docstring). Returns 0, or 1
        when placement or the gateway died for good (the caller then stops the rest)."""
        policy = self.config.restart_policy
        pending: list[Child] = []            # dead, waiting for their backoff
        while not stop.wait(0.2):
            with self._lock:
                children = list(self.children)
            for child in children:
                if child in pending or child.process.poll() is None:
                    continue
                code = child.process.poll()
                self.restart_metrics.up.labels(child=child.name).set(0)
                if code == 0 and child.name.startswith(("expert-", "attention-")):
                    # a worker that exits cleanly meant to (a drained expert worker): not a death
                    logger.info("%s exited cleanly; not restarting it", child.name)
                    with self._lock:
                        self.children.remove(child)
                    continue
                state = self._restarts.setdefault(child.name, RestartState())
                logger.error("%s", child.describe_exit(code))
                if state.died(policy, time.monotonic()):
                    logger.warning("restarting %s in %.1f s (restart %d within %.0f s)", child.name, state.backoff_s,
                                   len(state.deaths), policy.window_s)
                    pending.append(child)
                    continue
                essential = child.name in ("placement", "gateway") or policy.max_restarts == 0
                logger.error("%s died %d times within %.0f s%s", child.name, len(state.deaths), policy.window_s,
                             "; stopping the deployment" if essential else
                             "; leaving it down (the rest keep serving)")
                with self._lock:
                    self.children.remove(child)
                if essential:
                    return 1
            for child in [c for c in pending if time.monotonic() >= self._restarts[c.name].next_start]:
                pending.remove(child)
                self._restart(child)
        return 0

    def _restart(self, child: Child) -> None:
        """Starts a dead child again with its flags; its port line is read on a thread of its own."""
        self._start_process(child)
        self.restart_metrics.restarts.labels(child=child.name).inc()
        self.num_restarts[child.name] = self.num_restarts.get(child.name, 0) + 1
        logger.info("restarted %s (pid %d)", child.name, child.process.pid)

        def read_port() -> None:
            try:
                self._await_port(child, child.port_key)
            except RuntimeError as exc:
                logger.error("restarted %s: %s", child.name, exc)
                if child.process.poll() is None:
                    child.process.kill()        # the supervisor counts it as another death
        threading.Thread(target=read_port, name=f"port-{child.name}", daemon=True).start()


    def stop(self, grace_s: float = 10.0) -> None:
        with self._lock:
            children = list(self.children)
        for child in reversed(children):           # gateway first, placement last
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing it", child.name, grace_s)
                try:
                    os.killpg(child.process.pid, signal.SIGKILL)
                except ProcessLookupError:   # not its own group yet
                    child.process.kill()
                child.process.wait()
        with self._lock:
            self.children.clear()

    @property
    def metrics_endpoints(self) -> dict[str, str]:
        """Child name → ``host:port`` of its Prometheus ``/metrics`` (children that announced one)."""
        return {c.name: f"{self.config.host}:{c.metrics_port}" for c in self.children if c.metrics_port}

    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def check_device(flag: str, device: str) -> None:
    """ValueError naming ``flag`` unless ``device`` reads as a torch device: cpu, cuda or cuda:N."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ValueError(f"{flag}: {device!r} is not a device; use cpu, cuda or cuda:N")


def _set_flag(args: list[str], flag: str, value: str) -> None:
    """Sets ``flag``'s value in ``args`` in place (appends it when absent)."""
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
