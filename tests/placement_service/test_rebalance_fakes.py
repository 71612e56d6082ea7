"""Fake workers on the controller's own API (no gRPC, no processes) for the rebalance tests.

A ``FakeCluster`` registers A attention and W expert fakes with a ``PlacementController``;
each fake watches through ``controller.subscribe`` on its own thread and acks like the real
workers do (expert: PREPARE → load → ack, COMMIT → ack, RETIRE → drop older, ROLLBACK → drop;
attention: COMMIT → switch → ack). Behaviour per fake: ``prepare`` "ok" | "fail" | "silent",
``commit`` "ack" | "silent". The cluster checks the make-before-break invariants on every
event and lists violations: an attention worker never switches to a version some live expert
worker does not hold, and an expert worker never drops a version an attention worker uses.

Imported by test_rebalance*.py / test_admin*.py (no tests here).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from epserve.placement_types import UpdatePhase, WorkerRole, WorkerState
from epserve.placement_service.admin import AdminOps
from epserve.placement_service.broadcast import SubscriptionClosed
from epserve.placement_service.config import PlacementConfig
from epserve.placement_service.controller import PlacementController
from epserve.placement_service.eplb_loop import EplbLoop
from epserve.placement_service.errors import PlacementError
from epserve.placement_service.rebalancer import Rebalancer
from epserve.placement_service.state_db import StateDB


@dataclass
class Service:
    controller: PlacementController
    rebalancer: Rebalancer
    admin: AdminOps
    eplb: EplbLoop
    db: StateDB | None = None

    def close(self) -> None:
        self.controller.close()
        if self.db is not None:
            self.db.close()


def make_service(model_dir, db_path=None, **overrides) -> Service:
    """A controller + rebalancer + admin + EPLB loop, as server.py wires them (no gRPC)."""
    fields = dict(model_path=str(model_dir), dp_size=2, ep_size=2, heartbeat_interval_ms=100,
                  heartbeat_timeout_ms=1000, eplb_prepare_timeout_s=5.0, eplb_commit_timeout_s=5.0)
    config = PlacementConfig(**{**fields, **overrides})
    from epserve.placement_service.initial_placement import initial_phy2log

    db = StateDB(db_path) if db_path is not None else None
    controller = PlacementController(config, "127.0.0.1:1", initial_phy2log(config), db)
    rebalancer = Rebalancer(controller)
    admin = AdminOps(controller, rebalancer)
    return Service(controller, rebalancer, admin, EplbLoop(admin, rebalancer), db)


@dataclass
class FakeWorker:
    cluster: FakeCluster
    worker_id: str
    role: WorkerRole
    prepare: str = "ok"  # ok | fail | silent
    commit: str = "ack"  # ack | silent (attention; it still acks its first map)
    events: list[tuple[UpdatePhase, int]] = field(default_factory=list)
    held: set[int] = field(default_factory=set)  # expert: versions resident
    version: int = 0  # attention: version routed with

    def phases(self, version: int) -> list[UpdatePhase]:
        return [phase for phase, v in self.events if v == version]

    def handle(self, phase: UpdatePhase, version: int) -> None:
        controller = self.cluster.controller
        self.events.append((phase, version))
        ok, error = True, ""
        if self.role is WorkerRole.EXPERT:
            if phase is UpdatePhase.PREPARE:
                if self.prepare == "silent":
                    return
                if self.prepare == "fail":
                    ok, error = False, "out of memory loading experts"
                else:
                    self.held.add(version)
            elif phase is UpdatePhase.COMMIT:
                self.held.add(version)
            elif phase is UpdatePhase.RETIRE:
                in_use = [a.version for a in self.cluster.attention if a.version < version]
                if in_use:
                    self.cluster.violations.append(f"{self.worker_id} retired below {version} while attention "
                                                   f"uses {in_use}")
                self.held = {v for v in self.held if v >= version}
            elif phase is UpdatePhase.ROLLBACK:
                self.held.discard(version)
        else:
            if phase is not UpdatePhase.COMMIT or (self.commit == "silent" and self.version):
                return  # a silent attention worker still starts on its first map
            # make-before-break: every expert worker placement counts as alive holds the version
            # (a dead one is routed around and never asked; whether its fake acked is a race)
            missing = [e.worker_id for e in self.cluster.experts
                       if version not in e.held and not self.cluster.is_dead(e.worker_id)]
            if missing and self.version:  # the very first map is installed on COMMIT itself
                self.cluster.violations.append(f"{self.worker_id} switched to {version} before {missing} held it")
            self.version = version
        try:
            controller.ack(self.worker_id, version, phase, ok, error)
        except PlacementError:
            pass  # shutting down


class FakeCluster:
    def is_dead(self, worker_id: str) -> bool:
        try:
            return self.controller.worker(worker_id).state is WorkerState.DEAD
        except PlacementError:
            return False

    def __init__(self, controller: PlacementController, dp_size: int = 2, ep_size: int = 2,
                 expert_options: dict[str, dict] | None = None, attention_options: dict[str, dict] | None = None):
        self.controller = controller
        self.violations: list[str] = []
        self.experts = [FakeWorker(self, f"expert-{i}", WorkerRole.EXPERT,
                                   **(expert_options or {}).get(f"expert-{i}", {})) for i in range(ep_size)]
        self.attention = [FakeWorker(self, f"attn-{i}", WorkerRole.ATTENTION,
                                     **(attention_options or {}).get(f"attn-{i}", {})) for i in range(dp_size)]
        self._subscriptions = []
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    @property
    def workers(self) -> list[FakeWorker]:
        return [*self.experts, *self.attention]

    def worker(self, worker_id: str) -> FakeWorker:
        return next(w for w in self.workers if w.worker_id == worker_id)

    def start(self, heartbeat_s: float | None = None) -> FakeCluster:
        """Register, watch; with ``heartbeat_s`` also heartbeat (needed when a health monitor runs)."""
        fingerprint = self.controller.config.model.fingerprint
        for fake in self.workers:
            self.controller.register(fake.worker_id, int(fake.role), f"127.0.0.1:{40000 + len(fake.worker_id)}",
                                     1.0, "cpu", fingerprint, -1)
        for fake in self.workers:
            subscription = self.controller.subscribe(fake.worker_id)
            self._subscriptions.append(subscription)
            thread = threading.Thread(target=self._watch, args=(fake, subscription), daemon=True)
            thread.start()
            self._threads.append(thread)
        if heartbeat_s is not None:
            thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _beat(self, every_s: float) -> None:
        while not self._stopped.wait(every_s):
            try:
                self.heartbeat_all()
            except PlacementError:
                return

    def _watch(self, fake: FakeWorker, subscription) -> None:
        while True:
            try:
                update = subscription.get(timeout_s=0.1)
            except SubscriptionClosed:
                return
            if update is not None:
                fake.handle(update.phase, update.expert_map.version)

    def heartbeat_all(self) -> None:
        for fake in self.workers:
            self.controller.heartbeat(fake.worker_id)

    def stop(self) -> None:
        self._stopped.set()
        for subscription in self._subscriptions:
            self.controller.unsubscribe(subscription)
        for thread in self._threads:
            thread.join(timeout=2)


def report_load(controller: PlacementController, counts: torch.Tensor, passes: int = 10,
                worker_id: str = "attn-0") -> None:
    """counts [L, P] under the current map."""
    current = controller.current_map()
    controller.report_load(worker_id, current.version, counts.shape[0], counts.shape[1],
                           counts.flatten().tolist(), passes)


def skewed_counts(controller: PlacementController, hot_slots: int = 2) -> torch.Tensor:
    """[L, P] load with the first ``hot_slots`` slots (all on worker 0) carrying most tokens."""
    current = controller.current_map()
    counts = torch.full((current.num_layers, current.num_physical_slots), 10, dtype=torch.int64)
    counts[:, :hot_slots] = 400
    return counts
