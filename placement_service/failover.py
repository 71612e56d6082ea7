"""Elastic EP in placement (``--elastic-ep-backend``): keep every expert served while expert
workers die, come back, join and leave.

Legend: L MoE layers, E logical experts, P physical slots, W expert workers (slot owners),
S = P // W slots per worker.

Thread: ``run`` on the "placement-failover" thread, woken by ``notify`` (the controller's
``on_membership``: registrations, health changes, probe verdicts) and at least every
``recheck_s``. Each wake-up first probes SUSPECT workers, then reconciles the map with the
workers' health — one map change at a time, each through the ``Rebalancer`` (make-before-break;
a change already running is waited for). ``plan_change`` decides, in this order:

1. An expert worker that is not live (DEAD) still holds experts:
   a. ``failover``: a routing-only version (``elastic_map.routing_only``): its slots emptied
      wherever the expert keeps a live replica. Nothing is loaded anywhere, so the version
      commits within milliseconds; attention workers redo their interrupted layer under it.
   b. ``reload``: experts with no live replica left (their slots stayed in (a), so requests for
      them waited) are loaded onto survivors (``elastic_map.reload_uncovered``: empty slots
      first, else a redundant replica). Expert workers load these at full speed.
   Either makes an ``elasticity_aware`` rebalance due (3).
2. ``scale_out``: a live expert worker that owns no slots (a new one) gets S empty slots
   appended; the slot owners grow.
3. ``elastic_rebalance``: ``elasticity_aware`` over the live workers (load window, else
   uniform load) when due after 1 or 2, or when a live worker holds no expert (new, restarted
   after its slots were emptied, or started again after a drain): it receives experts.

Suspicions (``report_suspicion``, on the ReportSuspicion RPC's thread): a worker reports a
data-plane peer that timed out or broke a link. The suspect is marked SUSPECT and its gRPC port
probed at once (a TCP connect within ``--elastic-ep-probe-timeout-ms``, three times over 250 ms):
refused or no answer → DEAD now, else ALIVE again (the reporter then re-forms its link). Workers SUSPECT from missed
heartbeats are probed the same way, so a silent death is found after about two heartbeat
intervals instead of the heartbeat timeout. A hung process still accepts connections: it is
found by the heartbeat timeout.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import torch

from epserve import elastic_map
from epserve.expert_map import ExpertMap
from epserve.placement_types import WorkerInfo, WorkerRole, WorkerState
from epserve.placement_service.admin import AdminOps
from epserve.placement_service.controller import PlacementController
from epserve.placement_service.errors import PlacementError
from epserve.placement_service.rebalancer import MapChange, Rebalancer

logger = logging.getLogger(__name__)

LIVE_STATES = (WorkerState.ALIVE, WorkerState.SUSPECT)      # DRAINING and DEAD workers hold no slots
BUSY_RETRY_S = 0.05          # another map change runs: look again this soon
MAX_BACKOFF_S = 5.0          # after a failed change or a plan that cannot be made
SUSPICION_PROBES_S = (0.0, 0.1, 0.25)   # when a reported suspect is probed (DEAD at the first refusal)


def probe_address(address: str, timeout_s: float) -> bool:
    """True when something accepts a TCP connection at ``host:port`` within ``timeout_s``: the
    worker's process is there (a killed one's port refuses at once)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


class CannotPlan(Exception):
    """The live workers cannot hold every expert (too few slots): wait for a worker to come."""


def plan_change(current: ExpertMap, experts: list[WorkerInfo], rebalance_due: bool,
                plan_rebalance: Callable[[ExpertMap], torch.Tensor], weight: torch.Tensor | None) -> MapChange | None:
    """The next elastic map change for ``current``, or None. ``experts``: every registered expert
    worker; ``plan_rebalance(map)`` → an ``elasticity_aware`` target phy2log [L, P] over the live
    owners; ``weight`` [L, E] or None (uniform). Raises CannotPlan."""
    state = {w.worker_id: w.state for w in experts}
    owners = current.slot_owners
    live = torch.tensor([state.get(owner) in LIVE_STATES for owner in owners])               # [W]
    phy2log, num_logical = current.phy2log, current.num_logical_experts
    lost = ~elastic_map.live_slots(current.num_physical_slots, live)                            # [P]
    newcomers = tuple(w.worker_id for w in experts if w.worker_id not in owners and w.state in LIVE_STATES)
    if bool((phy2log[:, lost] >= 0).any()):
        routed = elastic_map.routing_only(phy2log, live, num_logical)
        if not torch.equal(routed, phy2log):
            return MapChange("failover", routed)
        try:
            return MapChange("reload", elastic_map.reload_uncovered(phy2log, live, num_logical, weight))
        except ValueError as exc:
            if not newcomers:
                raise CannotPlan(str(exc)) from None
    if newcomers:
        extended = elastic_map.extend(phy2log, current.num_workers, len(newcomers))
        return MapChange("scale_out", extended, slot_owners=owners + newcomers)
    per = current.slots_per_worker
    empty = [owner for index, owner in enumerate(owners)
             if bool(live[index]) and bool((phy2log[:, index * per:(index + 1) * per] < 0).all())]
    if rebalance_due or empty:
        try:
            target = plan_rebalance(current)
        except PlacementError as exc:
            raise CannotPlan(str(exc)) from None
        return None if torch.equal(target, phy2log) else MapChange("elastic_rebalance", target)
    return None


class Failover:
    def __init__(self, controller: PlacementController, admin: AdminOps, rebalancer: Rebalancer,
                 probe: Callable[[str, float], bool] = probe_address, recheck_s: float = 1.0) -> None:
        self.controller, self.admin, self.rebalancer = controller, admin, rebalancer
        self.probe_timeout_s = controller.config.elastic_ep_probe_timeout_ms / 1000
        self._probe, self.recheck_s = probe, recheck_s
        self._wake = threading.Event()
        self._rebalance_due = False
        self.num_changes = 0
        controller.on_membership = self.notify

    def notify(self) -> None:
        """Something changed (any thread, returns at once): reconcile soon."""
        self._wake.set()

    # -- suspicions ----------------------------------------------------------------------
    def report_suspicion(self, reporter_id: str, suspect_rank: int, reason: str) -> WorkerInfo:
        """The suspect after probing it (ALIVE, SUSPECT or DEAD). Raises NotFound."""
        info = self.controller.suspect(reporter_id, suspect_rank, reason)
        if info.state in (WorkerState.SUSPECT, WorkerState.ALIVE):
            self._judge(info, f"{reporter_id} reported {reason}", SUSPICION_PROBES_S)
        return self.controller.worker(info.worker_id)

    def _judge(self, info: WorkerInfo, why: str, probes_s: tuple[float, ...] = (0.0,)) -> None:
        """Probe at each offset of ``probes_s``: DEAD at the first refusal, ALIVE when all answer. A
        process being killed can still complete a TCP handshake for a moment after its peers saw
        its links break, so a reported suspect is probed a few times."""
        started = time.monotonic()
        for offset in probes_s:
            time.sleep(max(started + offset - time.monotonic(), 0.0))
            if not self._probe(info.address, self.probe_timeout_s):
                self.controller.mark_dead(info.worker_id, f"{why}; nothing accepts connections at {info.address}")
                return
        self.controller.mark_alive(info.worker_id)

    # -- the thread ----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        backoff = BUSY_RETRY_S
        while not stop.is_set():
            self._wake.clear()
            try:
                changed = self.step()
                backoff = BUSY_RETRY_S
            except CannotPlan as exc:
                logger.error("elastic EP: cannot keep every expert served: %s", exc)
                changed, backoff = False, MAX_BACKOFF_S
            except PlacementError as exc:         # busy, aborted (a worker died mid-change), shutting down
                if not self.rebalancer.in_progress:
                    logger.warning("elastic EP: map change failed (%s); trying again", exc)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                self._wake.wait(BUSY_RETRY_S if self.rebalancer.in_progress else backoff)
                continue
            if not changed:
                self._wake.wait(self.recheck_s)

    def step(self) -> bool:
        """Probe SUSPECT workers, then apply the next elastic change (if any). True when a map
        version was committed."""
        for info in self.controller.list_workers():
            if info.state == WorkerState.SUSPECT:
                self._judge(info, "missed heartbeats")
        if not self.controller.is_ready or self.rebalancer.in_progress:
            return False
        experts = [w for w in self.controller.list_workers() if w.role == WorkerRole.EXPERT]
        weight = self.admin.load(required=False)
        decided: list[str] = []

        def change(current: ExpertMap) -> MapChange | None:
            made = plan_change(current, experts, self._rebalance_due, self._plan_rebalance, weight)
            decided.append(made.operation if made is not None else "")
            return made

        started = time.monotonic()
        result = self.rebalancer.apply("elastic", change, detail="elastic EP")
        operation = decided[-1] if decided else ""
        self._rebalance_due = operation not in ("", "elastic_rebalance")     # due after 1. and 2.
        if result.num_versions:
            self.num_changes += 1
            logger.info("elastic EP: %s, version %d → %d in %.0f ms", operation, result.previous_version,
                        result.version, (time.monotonic() - started) * 1000)
        return bool(result.num_versions)

    def _plan_rebalance(self, current: ExpertMap) -> torch.Tensor:
        weight = self.admin.load(required=False)
        if weight is None:
            weight = torch.ones(current.num_layers, current.num_logical_experts, dtype=torch.float64)
        return self.admin.plan_for(current, weight, "elasticity_aware").phy2log
