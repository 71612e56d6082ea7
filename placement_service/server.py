"""Builds and stops a running placement service: the one function tests and ``main`` call.

``start_placement_server(config)`` opens the state db (if any) and checks it belongs to
this deployment, starts the rendezvous store, reads the initial placement, builds the
controller, the rebalancer, the admin operations and the EPLB loop, serves Placement +
PlacementAdmin (+ health, reflection) and starts two threads: the health monitor and the
rebalancer thread (``EplbLoop.run``: completes a map change a restart interrupted, then
makes EPLB decisions). The rendezvous store is the torch.distributed TCPStore every worker joins
the data plane through (as a client); it holds nothing placement needs, so a restarted
service hosts a fresh one, on the same port when it can.

With ``--elastic-ep-backend`` a third thread runs the elastic failover (``failover.py``).

``PlacementServer.stop()`` undoes it in order: refuse new requests, wake every waiter and
end watch streams (a map change in progress stops where it is, writing nothing more: the
next start resumes it), stop the gRPC server (in-flight unary RPCs get the grace period),
stop both threads, drop the store, close the db, flush traces, stop the metrics endpoint.

Telemetry (docs/observability.md): with ``--otlp-endpoint`` a SERVER span per RPC (not the
polled or process-long ones, ``UNTRACED_RPCS``) and ``placement.push`` per map update sent to a
watcher. With ``--metrics-port`` ``PlacementMetrics``: worker states, map version and
balancedness, refreshed by the health monitor on every tick.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import torch.distributed as dist

from epserve.dataplane.torch_group import start_rendezvous_store
from epserve.grpc_server import GrpcServer, serve_grpc
from epserve.telemetry import (DEFAULT_UNTRACED_SERVICES, MetricsServer, PlacementMetrics, Tracing, setup_tracing,
                               start_metrics_server)
from epserve.placement_service.admin import AdminOps
from epserve.placement_service.config import PlacementConfig
from epserve.placement_service.controller import PlacementController
from epserve.placement_service.eplb_loop import EplbLoop
from epserve.placement_service.errors import PlacementError
from epserve.placement_service.failover import Failover
from epserve.placement_service.initial_placement import initial_load, initial_phy2log
from epserve.placement_service.rebalancer import Rebalancer
from epserve.placement_service.service import PlacementAdminServicer, PlacementServicer
from epserve.placement_service.state_db import StateDB
from epserve.process import start_daemon_thread
from epserve.protos import placement_pb2, placement_pb2_grpc

logger = logging.getLogger(__name__)

TRACING_SERVICE_NAME = "epserve-placement"
# Polled, or open for a worker's whole life (a WatchPlacement span would end only at exit).
UNTRACED_RPCS = (*DEFAULT_UNTRACED_SERVICES, "epserve.v1.Placement/Heartbeat", "epserve.v1.Placement/WatchPlacement",
                 "epserve.v1.Placement/ReportLoad", "epserve.v1.PlacementAdmin/ListWorkers",
                 "epserve.v1.PlacementAdmin/GetPlacement")


class PlacementServer:
    def __init__(self, config: PlacementConfig, controller: PlacementController, grpc_server: GrpcServer,
                 store: dist.TCPStore, db: StateDB | None, eplb: EplbLoop, tracing: Tracing,
                 metrics: PlacementMetrics | None = None, metrics_server: MetricsServer | None = None,
                 failover: Failover | None = None) -> None:
        self.config, self.controller, self.grpc_server = config, controller, grpc_server
        self.failover = failover
        self.eplb, self.rebalancer, self.admin = eplb, eplb.rebalancer, eplb.admin
        self.tracing, self.metrics, self._metrics_server = tracing, metrics, metrics_server
        self._store, self._db = store, db
        self._stop_monitor = threading.Event()
        self._stopped = False
        tick_s = min(config.heartbeat_interval_ms / 4, 500) / 1000
        self._monitor = start_daemon_thread(lambda: self._monitor_loop(tick_s), "placement-health-monitor")
        self._rebalancer_thread = start_daemon_thread(lambda: eplb.run(self._stop_monitor), "placement-rebalancer")
        self._failover_thread = (start_daemon_thread(lambda: failover.run(self._stop_monitor), "placement-failover")
                                 if failover is not None else None)

    @property
    def port(self) -> int:
        return self.grpc_server.port

    @property
    def address(self) -> str:
        return f"{self.config.advertise_host}:{self.port}"

    @property
    def dist_init_addr(self) -> str:
        return self.controller.dist_init_addr

    @property
    def metrics_port(self) -> int:
        """Port of ``/metrics``; 0 when metrics are off."""
        return self._metrics_server.port if self._metrics_server is not None else 0

    def _monitor_loop(self, tick_s: float) -> None:
        while not self._stop_monitor.wait(tick_s):
            self.controller.check_health()
            if self.metrics is not None:
                self._update_metrics(self.metrics)

    def _update_metrics(self, metrics: PlacementMetrics) -> None:
        metrics.set_worker_counts(Counter((w.role.name.lower(), w.state.name) for w in self.controller.list_workers()))
        try:
            expert_map, balancedness, _ = self.controller.get_placement(0)
        except PlacementError:   # no map yet
            return
        metrics.map_version.set(expert_map.version)
        metrics.balancedness.set(balancedness)

    def stop(self) -> None:
        """Idempotent; returns within about ``config.shutdown_grace_s`` + 1 s."""
        if self._stopped:
            return
        self._stopped = True
        self.controller.close()
        self.grpc_server.stop(self.config.shutdown_grace_s)
        self._stop_monitor.set()
        self._monitor.join(timeout=2.0)
        self._rebalancer_thread.join(timeout=2.0)
        if self._failover_thread is not None:
            self.failover.notify()
            self._failover_thread.join(timeout=2.0)
        self._store = None  # the TCPStore server stops with its last reference
        if self._db is not None:
            self._db.close()
        self.tracing.shutdown()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        logger.info("placement service stopped")


def start_placement_server(config: PlacementConfig) -> PlacementServer:
    tracing = setup_tracing(TRACING_SERVICE_NAME, config.otlp_endpoint)   # ValueError for a bad endpoint
    metrics = PlacementMetrics() if config.metrics_port is not None else None
    phy2log = initial_phy2log(config)
    db = _open_state_db(config) if config.state_db else None
    store = None
    try:
        store, dist_port = _start_store(config, db)
        dist_init_addr = f"{config.advertise_host}:{dist_port}"
        controller = PlacementController(config, dist_init_addr, phy2log, db, initial_load=initial_load(config))
        rebalancer = Rebalancer(controller, tracing=tracing, metrics=metrics)
        admin = AdminOps(controller, rebalancer)
        eplb = EplbLoop(admin, rebalancer)
        failover = Failover(controller, admin, rebalancer) if config.elastic else None
        grpc_server = serve_grpc(
            [(placement_pb2_grpc.add_PlacementServicer_to_server, PlacementServicer(controller, tracing, failover),
              placement_pb2.DESCRIPTOR.services_by_name["Placement"].full_name),
             (placement_pb2_grpc.add_PlacementAdminServicer_to_server, PlacementAdminServicer(controller, admin, eplb),
              placement_pb2.DESCRIPTOR.services_by_name["PlacementAdmin"].full_name)],
            config.host, config.port,
            max_workers=2 * config.world_size + 16,  # each watch stream holds a thread
            interceptors=tracing.server_interceptors(untraced=UNTRACED_RPCS), security=config.security,
            max_message_bytes=config.max_message_bytes)
        metrics_server = (start_metrics_server(config.metrics_port, metrics.registry, config.host)
                          if metrics is not None else None)
    except BaseException:
        store = None
        if db is not None:
            db.close()
        raise
    logger.info("placement service on %s:%d (%d attention workers, %d expert workers, %d MoE layers, "
                "%d experts + %d redundant, rendezvous %s, backend %s)", config.host, grpc_server.port,
                config.dp_size, config.ep_size, config.model.num_moe_layers, config.model.num_experts,
                config.ep_num_redundant_experts, dist_init_addr, config.moe_a2a_backend)
    if config.enable_eplb:
        logger.info("EPLB on: %s every %d forward passes, utilization threshold %g, min gain %g, %s layers per "
                    "version%s", config.eplb_algorithm, config.eplb_rebalance_num_iterations,
                    config.eplb_min_rebalancing_utilization_threshold, config.eplb_min_gain,
                    config.eplb_rebalance_layers_per_chunk or "all", " (paused)" if eplb.paused else "")
    if failover is not None:
        logger.info("elastic EP on (%s): lost expert workers are routed around and replaced, suspects probed "
                    "within %d ms; EPLB algorithm %s", config.elastic_ep_backend, config.elastic_ep_probe_timeout_ms,
                    config.eplb_algorithm)
    return PlacementServer(config, controller, grpc_server, store, db, eplb, tracing, metrics, metrics_server,
                           failover)


def _open_state_db(config: PlacementConfig) -> StateDB:
    """Open --state-db and refuse it when it was written for another model or sizes."""
    db = StateDB(config.state_db)
    settings = {
        "model_fingerprint": config.model.fingerprint,
        "num_moe_layers": str(config.model.num_moe_layers),
        "num_experts": str(config.model.num_experts),
        "dp_size": str(config.dp_size),
        "ep_size": str(config.ep_size),
        "ep_num_redundant_experts": str(config.ep_num_redundant_experts),
    }
    stored = db.settings()
    mismatched = [f"{key} was {stored[key]}, now {value}" for key, value in settings.items()
                  if key in stored and stored[key] != value]
    if mismatched:
        db.close()
        raise ValueError(f"--state-db {config.state_db} belongs to another deployment ({'; '.join(mismatched)}); "
                         "start with the flags it was made with or point --state-db at a fresh file")
    db.save_settings(settings)
    return db


def _start_store(config: PlacementConfig, db: StateDB | None) -> tuple[dist.TCPStore, int]:
    """--dist-port, else the port a previous run used (so workers' dist_init_addr stays valid), else any."""
    previous = int(db.settings().get("dist_port", 0)) if db is not None else 0
    port = config.dist_port or previous
    try:
        store, bound = start_rendezvous_store(config.host, port)
    except RuntimeError as exc:
        if config.dist_port or not previous:
            raise OSError(f"cannot host the rendezvous store on {config.host}:{port}: {exc}; "
                          "choose another --dist-port (0 = pick)") from exc
        logger.warning("previous rendezvous port %d is taken (%s); picking a new one", previous, exc)
        store, bound = start_rendezvous_store(config.host, 0)
    if db is not None:
        db.save_settings({"dist_port": str(bound)})
    return store, bound
