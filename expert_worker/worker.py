"""The expert worker process: wiring of expert store, data plane, placement and gRPC.

Start-up: measure the capacity (``--capacity auto``, capacity.py) → serve gRPC health (NOT_SERVING)
→ register with placement (EXPERT role, with capacity and device) → watch.
Map updates (make-before-break, see docs/architecture.md):
- PREPARE v / COMMIT v: make v's slots for this worker resident (only changed experts are read;
  v-1 keeps serving meanwhile), then ack (ok=False with the error if loading failed).
- RETIRE v: drop every version below v. ROLLBACK v: drop v.
The first COMMIT also joins the data-plane group and starts the expert server thread, which
serves batches from every attention worker until shutdown. Health turns SERVING then.

Elastic EP (placement's ``--elastic-ep-backend``, ``elastic.py``): the torch data plane accepts
links as attention workers offer them (again after failures); a PREPARE that reloads experts no
live worker holds loads at full speed; a drained worker exits (SIGTERM to itself, exit code 0)
once placement retires the last version that gave it slots.

Telemetry (made in ``main()``, passed in; default off): each batch's compute runs through
``ObservedCompute`` (``expert.compute`` span linked to its senders, batch metrics); map updates
refresh the held-versions and resident-bytes gauges.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from epserve.dummy_weights import open_weights
from epserve.expert_map import ExpertMap
from epserve.grpc_server import GrpcServer, serve_grpc
from epserve.model_config import load_model_spec, model_fingerprint
from epserve.moe_runner import make_moe_runner
from epserve.placement_client import PlacementClient
from epserve.placement_types import DataPlaneInfo, UpdatePhase, WorkerRole
from epserve.process import start_daemon_thread
from epserve.telemetry import ExpertWorkerMetrics, Tracing, setup_tracing
from epserve.weights import parse_dtype
from epserve.expert_worker import elastic
from epserve.expert_worker.capacity import measure_capacity
from epserve.expert_worker.config import ExpertWorkerConfig
from epserve.expert_worker.expert_store import ExpertStore
from epserve.expert_worker.load_pacer import LoadPacer
from epserve.expert_worker.observed_compute import ObservedCompute

logger = logging.getLogger(__name__)


TRACING_SERVICE_NAME = "epserve-expert-worker"


class ExpertWorker:
    def __init__(self, config: ExpertWorkerConfig, tracing: Tracing | None = None,
                 metrics: ExpertWorkerMetrics | None = None) -> None:
        self.config = config
        self.tracing = tracing if tracing is not None else setup_tracing(TRACING_SERVICE_NAME, None)
        self.metrics = metrics
        self.spec = load_model_spec(config.model_path)
        weights = open_weights(config.model_path, config.load_format, self.spec)   # read again on map changes
        runner = make_moe_runner(config.moe_runner_backend, config.device, dtype=parse_dtype(config.dtype))
        self.store = ExpertStore(self.spec, weights, config.worker_id, runner, parse_dtype(config.dtype), config.device)
        self.capacity = (config.capacity if config.capacity is not None   # --capacity auto: measured once, here
                         else measure_capacity(self.spec, runner, parse_dtype(config.dtype), config.device))
        self.server: GrpcServer = serve_grpc([], config.host, config.port, serving=False,
                                             interceptors=self.tracing.server_interceptors(),
                                             security=config.security)
        self.address = f"{config.advertise_host}:{self.server.port}"
        self.placement = PlacementClient(config.placement, config.worker_id, WorkerRole.EXPERT, self.address,
                                         capacity=self.capacity, device=config.device,
                                         model_fingerprint=model_fingerprint(config.model_path, config.load_format),
                                         timeout_s=config.rpc_timeout_s, security=config.security)
        self.expert_server = None
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._pacer = LoadPacer(config.expert_load_duty_cycle)
        self._serving_map: ExpertMap | None = None     # the last COMMIT (elastic: is a PREPARE urgent?)

    def start(self, register_deadline_s: float = 120.0) -> None:
        self.registration = self.placement.register(register_deadline_s)
        logger.info("registered as rank %d of %d", self.registration.rank, self.registration.world_size)
        self.placement.watch(self._on_update)

    def _on_update(self, phase: UpdatePhase, expert_map: ExpertMap, data_plane: DataPlaneInfo) -> None:
        lower_this_thread_priority()
        leaving = False
        if phase in (UpdatePhase.COMMIT, UpdatePhase.PREPARE):
            try:   # the first map loads at full speed; later ones while serving, paced (unless requests wait)
                started, slept = time.perf_counter(), self._pacer.slept_s
                held = expert_map.version in self.store.versions     # COMMIT after its PREPARE: nothing to load
                paced = self.expert_server is not None and not elastic.urgent(self._serving_map, data_plane)
                self.store.install(expert_map, self._pacer if paced else None)
                if self.metrics is not None and not held:
                    self.metrics.map_load_duration.observe(time.perf_counter() - started)
                    self.metrics.map_load_paced_sleep.inc(self._pacer.slept_s - slept)
            except Exception as exc:  # a failed prepare is reported, never half-applied
                logger.exception("cannot load map version %d", expert_map.version)
                self.placement.ack(expert_map.version, phase, ok=False, error=str(exc))
                return
        elif phase is UpdatePhase.RETIRE:
            self.store.retire_below(expert_map.version)
            leaving = (self.registration.elastic_ep_backend != "none"
                       and elastic.drained_out(self.config.worker_id, expert_map, data_plane))
        elif phase is UpdatePhase.ROLLBACK:
            self.store.drop(expert_map.version)
        if self.metrics is not None:
            self.metrics.set_held_versions(self.store.versions)
            self.metrics.resident_weight_bytes.set(self.store.resident_bytes())
        if phase is UpdatePhase.COMMIT:
            self._serving_map = expert_map
        with self._lock:
            if phase is UpdatePhase.COMMIT and self.expert_server is None:
                self._start_serving(data_plane)
        self.placement.ack(expert_map.version, phase)
        if leaving:
            logger.info("drained: map version %d gives this worker no slot and every attention worker uses it; "
                        "exiting", expert_map.version)
            os.kill(os.getpid(), signal.SIGTERM)

    def _start_serving(self, data_plane: DataPlaneInfo) -> None:
        from epserve import dataplane

        options = {}
        if self.registration.elastic_ep_backend != "none" and data_plane.backend == "torch":
            from epserve.dataplane.torch_links import ELASTIC_FORM_TIMEOUT_S

            options = dict(eager=False, connect_timeout_s=ELASTIC_FORM_TIMEOUT_S)     # accept links as offered
        if data_plane.backend == "cuda_ipc":        # expert steps replay CUDA graphs when the kernels allow it
            options = dict(step_graphs=bool(getattr(self.store.runner, "capturable", False)))
        self.expert_server = dataplane.make_expert_server(
            data_plane.backend, rank=self.registration.rank, world_size=data_plane.world_size,
            dist_init_addr=data_plane.dist_init_addr,
            attention_ranks=sorted(w.rank for w in data_plane.workers if w.role == WorkerRole.ATTENTION),
            timeout_s=self.config.rpc_timeout_s * 6, **options)
        compute = self.store.compute
        if self.tracing.enabled or self.metrics is not None:
            compute = ObservedCompute(compute, self.tracing, self.metrics)
        start_daemon_thread(lambda: self.expert_server.serve(compute), "expert-server")
        self.server.set_serving(True)
        self.ready.set()
        logger.info("serving experts for map version(s) %s", self.store.versions)

    def stop(self) -> None:
        self.server.set_serving(False)
        if self.expert_server is not None:
            self.expert_server.stop()
        self.server.stop(grace_s=1.0)
        self.placement.close()


def lower_this_thread_priority(niceness: int = 10) -> None:
    """Loading a new map's experts must not slow serving: the watch thread that loads them runs
    at a lower CPU priority than the data-plane threads (Linux sets nice per thread)."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except (AttributeError, OSError):       # not Linux, or not permitted: serve at equal priority
        pass
