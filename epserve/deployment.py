"""A whole deployment as local processes: what ``epserve up`` (and end-to-end tests) start.

Order: placement service → expert workers (none when colocated) → attention workers → gateway. Each child prints
``NAME_PORT=<port>`` on stdout when bound; its stderr goes to our stderr (or a log file).
Readiness = placement lists every worker ALIVE and the gateway's health says SERVING.
Children are placed in their own process group and asked to die with this process
(PR_SET_PDEATHSIG), so neither Ctrl-C nor a crash of the launcher leaves one behind.

Security: with ``auth_token_file`` every child gets ``--auth-token-file`` (never the token itself on
a command line) and the TLS files; ``security`` is what this launcher uses to check readiness.

Supervision (``wait``): a child that dies is started again with the same flags (placement and the
gateway on the ports they had, so clients and workers find them again; placement resumes from
``state_db``), after a backoff, at most ``max_restarts`` times within ``restart_window_s``
(``supervisor.py``). A worker given up on is left down while the rest serve; placement or the
gateway given up on ends the deployment. ``max_restarts`` 0: the first death ends it. Failures
quote the child's own last error line (its stderr is read through ``supervisor.ChildLog``).

What the deployment is made of and the flags each process gets: ``epserve/deployment_config.py``.
"""

from __future__ import annotations

import logging
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

from epserve.deployment_config import DeploymentConfig
from epserve.grpc_security import open_channel, security_args
from epserve.protos import placement_pb2, placement_pb2_grpc
from epserve.supervisor import ChildLog, RestartMetrics, RestartState

logger = logging.getLogger(__name__)

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
            if code is None and not reader.is_alive():     # stdout closed: it is exiting, give it a moment
                try:
                    code = child.process.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
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


def _set_flag(args: list[str], flag: str, value: str) -> None:
    """Sets ``flag``'s value in ``args`` in place (appends it when absent)."""
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
