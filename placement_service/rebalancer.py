"""Rebalancer: every change of the expert map, make-before-break, one change at a time.

Legend: L MoE layers, E logical experts, P physical slots, W expert workers.

A *map change* (an EPLB decision, an admin Rebalance / SetRedundancy / Rollback / Drain /
ImportSnapshot) has a target phy2log [L, P'] planned against the version v in service. It
is applied chunk by chunk: each chunk is ``--eplb-rebalance-layers-per-chunk`` of the layers
whose slots change (all of them when 0; all layers at once when the slot count changes), and
each chunk is one new version n whose phy2log differs from the version before only there:

1. ``reserve_version``: n is persisted as handed out before anything is sent; it is never
   used again, even if this chunk is rolled back (so no worker can mix two maps of one number).
2. PREPARE n to every watcher (attention workers ignore it). Expert workers load the new
   slots beside the ones serving and ack. Wait, on the ``AckBoard``, until every expert worker
   that is not DEAD acked ok — at most ``--eplb-prepare-timeout-s``.
3. A failed ack, a worker dying or the timeout → ROLLBACK n (expert workers drop it); the
   history never sees n; the change stops and raises ``Aborted`` naming the version in
   service. Chunks committed before stay: each is a complete, valid map (``Rollback``
   returns to the version the change started from).
4. COMMIT n: appended to the history (persisted) and pushed; attention workers switch at
   their next step boundary and ack. Expert workers serve v and n side by side meanwhile.
5. Once every attention worker that is not DEAD acked n — at most
   ``--eplb-commit-timeout-s`` — RETIRE n: expert workers drop older versions. If one lags,
   nothing is retired and the change stops after this chunk (result ``message`` says so):
   retiring would strand the laggard on a dropped version.

No step of this waits on a decode step, and no decode step waits on it: attention workers
keep routing with v until they switch, and expert workers hold both versions until RETIRE.

Telemetry (docs/observability.md): a ``placement.rebalance`` span per change (attributes
``epserve.reason`` = the operation, ``epserve.from_version``, ``epserve.to_version``), a child
of the admin RPC's span when an operator asked for it, with ``placement.plan`` and, per chunk,
``placement.prepare`` and ``placement.commit`` inside; ``epserve_placement_rebalances_total
{reason, outcome=committed|rolled_back}`` and ``epserve_placement_rebalance_duration_seconds``.

Restart: the change in progress is persisted (``operation``: target, base version, workers to
drain) and so is a PREPARE in flight (``prepare_version``). A service that stops mid-change
(crash or SIGTERM: a shutdown writes nothing more) resumes on restart, on the rebalancer
thread, once every worker was heard from again: a prepared but uncommitted version is rolled
back (ROLLBACK sent, number burned), the committed current version is retired once attention
workers are on it, and the change then *completes* from the current map to its persisted
target, chunk by chunk, with fresh version numbers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from epserve.expert_map import ExpertMap
from epserve.placement_types import UpdatePhase, WorkerState
from epserve.placement_service.ack_board import BoardClosed
from epserve.placement_service.controller import PlacementController
from epserve.placement_service.errors import Aborted, FailedPrecondition, InvalidArgument, Unavailable
from epserve.placement_service.planner import RebalancePlan

if TYPE_CHECKING:
    from epserve.telemetry import PlacementMetrics, Tracing

logger = logging.getLogger(__name__)

MAX_DURATIONS = 1000  # recent change durations kept in memory (for metrics)


@dataclass(frozen=True)
class MapChange:
    """Where one operation goes: target phy2log [L, P'] and the numbers it was planned with."""
    operation: str  # eplb | rebalance | set_redundancy | rollback | drain | import
    target: torch.Tensor
    plan: RebalancePlan | None = None
    drain: tuple[str, ...] = ()  # expert workers this change empties (DrainWorker)
    rollback_to: int | None = None  # what a later Rollback returns to; None = the version this change starts from
    slot_owners: tuple[str, ...] = ()  # the target's slot owners when they change (scale-out); () = unchanged


@dataclass(frozen=True)
class ChangeResult:
    version: int  # in service afterwards
    previous_version: int
    num_versions: int  # committed by this change (0 = nothing to change)
    duration_ms: float
    plan: RebalancePlan | None = None
    message: str = ""


class Rebalancer:
    def __init__(self, controller: PlacementController, clock: Callable[[], float] = time.monotonic,
                 tracing: Tracing | None = None, metrics: PlacementMetrics | None = None) -> None:
        self.controller = controller
        self.config = controller.config
        self._clock = clock
        self._tracing, self._metrics = tracing, metrics
        self._busy = threading.Lock()
        self._running = ""  # what runs now, for error messages
        self.durations_ms: list[float] = []

    @property
    def in_progress(self) -> bool:
        return self._busy.locked()

    # -- entry points ----------------------------------------------------------------------
    def apply(self, operation: str, make_change: Callable[[ExpertMap], MapChange | None],
              detail: str = "") -> ChangeResult:
        """Plan (``make_change(current map)``, under the one-change-at-a-time lock) and apply.
        ``make_change`` may return None: nothing to do. Raises FailedPrecondition when a change
        is already running, Unavailable before the deployment is complete or while shutting
        down, InvalidArgument for an invalid target, Aborted when a prepare failed."""
        if not self._busy.acquire(blocking=False):
            raise FailedPrecondition(f"a map change is already running ({self._running}); "
                                     "wait for it to finish")
        try:
            self._running = detail or operation
            if not self.controller.is_ready:
                raise Unavailable("the deployment is not complete yet: every worker must register first")
            current = self.controller.current_map()
            with self._span("placement.rebalance", reason=operation, from_version=current.version) as span:
                with self._span("placement.plan", from_version=current.version):
                    change = make_change(current)
                if change is None:
                    return ChangeResult(current.version, current.version, 0, 0.0)
                self._check_target(current, change)
                if torch.equal(change.target, current.phy2log):
                    return ChangeResult(current.version, current.version, 0, 0.0, change.plan,
                                        "no change: the plan equals the map in service")
                result = self._run(change, current.version)
                span.set_attribute("epserve.to_version", result.version)
                return result
        finally:
            self._running = ""
            self._busy.release()

    def resume_interrupted(self, heard_timeout_s: float | None = None) -> ChangeResult | None:
        """After a restart: roll back a PREPARE left in flight, retire the current version, and
        complete the change that was in progress. Returns its result (None: nothing to resume)."""
        record = self.controller.load_json("operation")
        preparing = self.controller.load_json("prepare_version")
        if record is None and preparing is None:
            return None
        with self._busy:
            self._running = f"resuming {record['operation'] if record else 'a rollback'} after a restart"
            try:
                return self._resume(record, preparing, heard_timeout_s)
            finally:
                self._running = ""

    # -- the protocol ----------------------------------------------------------------------
    def _run(self, change: MapChange, base_version: int) -> ChangeResult:
        controller = self.controller
        start = self._clock()
        controller.save_json({"operation": {"operation": change.operation, "base_version": base_version,
                                            "target": change.target.tolist(), "drain": list(change.drain),
                                            "rollback_to": change.rollback_to,
                                            "slot_owners": list(change.slot_owners)}})
        num_versions, message = 0, ""
        try:
            num_versions, message = self._run_chunks(change, base_version)
        except BoardClosed:
            raise Unavailable("placement is shutting down; the map change resumes when it restarts") from None
        except Aborted:
            controller.save_json({"operation": None})
            self._count(change.operation, "rolled_back")
            raise
        duration_ms = (self._clock() - start) * 1000
        current = controller.current_map()
        settings: dict[str, object] = {"operation": None}
        if num_versions:
            settings.update(num_rebalances=controller.stat("num_rebalances") + 1, last_rebalance_ms=duration_ms)
            self.durations_ms = (self.durations_ms + [duration_ms])[-MAX_DURATIONS:]
            self._count(change.operation, "committed", duration_ms / 1000)
            logger.info("%s: version %d → %d in %d version(s), %.0f ms%s", change.operation, base_version,
                        current.version, num_versions, duration_ms, f" ({message})" if message else "")
        controller.save_json(settings)
        return ChangeResult(current.version, base_version, num_versions, duration_ms, change.plan, message)

    def _run_chunks(self, change: MapChange, base_version: int) -> tuple[int, str]:
        """Returns (versions committed, caveat). Raises Aborted after rolling a chunk back."""
        controller = self.controller
        num_versions = 0
        while True:
            current = controller.current_map()
            layers = next_chunk(current.phy2log, change.target, self.config.eplb_rebalance_layers_per_chunk)
            if not layers:
                return num_versions, ""
            phy2log = change.target.clone() if change.target.shape != current.phy2log.shape else current.phy2log.clone()
            phy2log[list(layers)] = change.target[list(layers)]
            new_map = ExpertMap(phy2log, current.num_logical_experts, controller.reserve_version(),
                                change.slot_owners or current.slot_owners)
            try:
                with self._span("placement.prepare", to_version=new_map.version, layers=list(layers)):
                    self._prepare(new_map)
            except Aborted as exc:
                done = (f"; {num_versions} earlier chunk(s) of this change stay committed (rollback returns "
                        f"to version {base_version})" if num_versions else "")
                raise Aborted(f"{change.operation}: {exc}; version {current.version} stays in service{done}") from None
            rollback_to = base_version if change.rollback_to is None else change.rollback_to
            with self._span("placement.commit", to_version=new_map.version, layers=list(layers)):
                controller.commit(new_map, change.operation, rollback_to, change.drain)
                num_versions += 1
                lagging = self._wait_switched(new_map)
            if lagging:
                rest = next_chunk(new_map.phy2log, change.target, 0)
                return num_versions, (f"attention workers {lagging} had not switched to version {new_map.version} "
                                      f"after {self.config.eplb_commit_timeout_s:g} s: older versions stay on "
                                      "expert workers" + (f"; layers {list(rest)} were not changed" if rest else ""))
            controller.publish_retire(new_map)

    def _prepare(self, new_map: ExpertMap) -> None:
        """PREPARE and wait for every live expert worker's ok; ROLLBACK and raise Aborted otherwise."""
        controller, version = self.controller, new_map.version
        controller.publish_prepare(new_map)
        expected, _ = controller.waiting_for_prepare(version)

        def verdict() -> str | None:
            failed = {w: a.error for w, a in controller.acks.acks(version, UpdatePhase.PREPARE).items() if not a.ok}
            if failed:
                worker, error = next(iter(failed.items()))
                return f"expert worker {worker} could not prepare version {version}: {error}"
            waiting, dead = controller.waiting_for_prepare(version)
            lost = [w for w in dead if w in expected]
            if lost:
                return f"expert workers {lost} died while preparing version {version}"
            return "" if not waiting else None

        timeout_s = self.config.eplb_prepare_timeout_s
        outcome = controller.acks.wait_for(verdict, timeout_s)
        if outcome == "":
            return
        if outcome is None:
            waiting, _ = controller.waiting_for_prepare(version)
            outcome = f"expert workers {waiting} did not ack PREPARE of version {version} within {timeout_s:g} s"
        logger.warning("rolling back version %d: %s", version, outcome)
        controller.publish_rollback(new_map)
        raise Aborted(outcome)

    def _wait_switched(self, expert_map: ExpertMap, timeout_s: float | None = None) -> list[str]:
        """Wait until every attention worker routes with ``expert_map``'s version; returns the laggards."""
        controller = self.controller
        timeout_s = self.config.eplb_commit_timeout_s if timeout_s is None else timeout_s
        done = controller.acks.wait_for(lambda: True if not controller.attention_behind(expert_map.version) else None,
                                        timeout_s)
        return [] if done else controller.attention_behind(expert_map.version)

    def _resume(self, record: dict | None, preparing: dict | None,
                heard_timeout_s: float | None) -> ChangeResult | None:
        controller = self.controller
        config = self.config
        timeout_s = heard_timeout_s if heard_timeout_s is not None else (
            config.heartbeat_timeout_ms / 1000 + config.eplb_prepare_timeout_s)
        unheard = controller.acks.wait_for(lambda: True if not controller.unheard_workers() else None, timeout_s)
        if not unheard:
            logger.warning("resuming the interrupted map change without hearing from %s", controller.unheard_workers())
        current = controller.current_map()
        if preparing is not None:
            orphan = ExpertMap(torch.tensor(preparing["phy2log"]), current.num_logical_experts,
                               preparing["version"], tuple(preparing["slot_owners"]))
            logger.info("rolling back version %d, prepared but not committed before the restart", orphan.version)
            controller.publish_rollback(orphan)
        lagging = self._wait_switched(current)
        if lagging:
            logger.warning("attention workers %s are not on version %d; not retiring older versions",
                           lagging, current.version)
        else:
            controller.publish_retire(current)
        if record is None:
            return None
        change = MapChange(record["operation"], torch.tensor(record["target"], dtype=torch.int64),
                           drain=tuple(record.get("drain", ())), rollback_to=record.get("rollback_to"),
                           slot_owners=tuple(record.get("slot_owners", ())))
        logger.info("completing %s (started from version %d) after a restart", change.operation,
                    record["base_version"])
        try:
            return self._run(change, record["base_version"])
        except Aborted as exc:
            logger.warning("could not complete the interrupted map change: %s", exc)
            return None

    def _span(self, name: str, **attributes):
        """A span made current for the block (attributes prefixed ``epserve.``); nothing without tracing."""
        if self._tracing is None:
            return contextlib.nullcontext(_NO_SPAN)
        return self._tracing.span(name, attributes={f"epserve.{key}": value for key, value in attributes.items()})

    def _count(self, operation: str, outcome: str, duration_s: float | None = None) -> None:
        if self._metrics is None:
            return
        self._metrics.rebalances.labels(reason=operation, outcome=outcome).inc()
        if duration_s is not None:
            self._metrics.rebalance_duration.observe(duration_s)

    def _check_target(self, current: ExpertMap, change: MapChange) -> None:
        target = change.target
        if target.dim() != 2 or target.shape[0] != current.num_layers:
            raise InvalidArgument(f"target phy2log has shape {tuple(target.shape)}, expected [{current.num_layers} "
                                  "layers, physical slots]")
        owners = change.slot_owners or current.slot_owners
        try:
            ExpertMap(target, current.num_logical_experts, 0, owners)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        per = target.shape[1] // len(owners)
        dead = [w.worker_id for w in self.controller.list_workers() if w.worker_id in owners
                and w.state == WorkerState.DEAD]
        # A slot of a DEAD worker may keep what it held (an elastic routing-only version leaves an
        # expert with no live replica where it was, until it is reloaded elsewhere), never gain one.
        kept = torch.zeros_like(target, dtype=torch.bool)
        if per == current.slots_per_worker:        # the same slots (a scale-out appends a worker's slots)
            kept[:, :current.num_physical_slots] = target[:, :current.num_physical_slots] == current.phy2log
        for worker_id in dead:
            index = owners.index(worker_id)
            cells = slice(index * per, (index + 1) * per)
            if bool(((target[:, cells] >= 0) & ~kept[:, cells]).any()):
                raise FailedPrecondition(f"the new map puts experts on expert worker {worker_id}, which is DEAD")


class _NoSpan:
    def set_attribute(self, key: str, value: object) -> None:
        pass


_NO_SPAN = _NoSpan()


def next_chunk(current: torch.Tensor, target: torch.Tensor, layers_per_chunk: int) -> tuple[int, ...]:
    """The layers of the next version: the first ``layers_per_chunk`` (0 = all) layers whose row
    differs between current [L, P] and target [L, P']; every layer when the slot counts differ."""
    if current.shape != target.shape:
        return tuple(range(target.shape[0]))
    changed = [int(i) for i in (current != target).any(dim=1).nonzero().flatten()]
    return tuple(changed[:layers_per_chunk] if layers_per_chunk else changed)
