"""EplbLoop: when to rebalance on its own (``--enable-eplb``), and the rebalancer thread.

Load arrives with ReportLoad (each attention worker every ``--load-report-interval-s``) into
the controller's EPLB window: tokens per logical expert [L, E] and forward passes per
attention worker since the last decision. ``notify`` (called by every ReportLoad, returns at
once) wakes the rebalancer thread when the window is full: the busiest attention worker has
run ``--eplb-rebalance-num-iterations`` forward passes in it (SGLang's "every N forward
passes", counted per attention worker because ours step independently).

A decision (``decide``) closes the window and then, in order:
1. skip when the current map's predicted balancedness under the window's load is at least
   ``--eplb-min-rebalancing-utilization-threshold`` (SGLang's utilization rule);
2. plan with ``--eplb-algorithm`` (under the rebalancer's lock, against the map in service);
3. skip unless the plan is worth its movement (``planner.worth_applying``: gain >=
   ``--eplb-min-gain`` × share of slots changed);
4. apply it make-before-break (``Rebalancer``), chunk by chunk.
Serving never waits for any of this: it runs on the rebalancer thread.

The same thread first completes a map change that a restart interrupted (``Rebalancer.
resume_interrupted``), whether EPLB is enabled or not. PauseEplb / ResumeEplb toggle a flag
persisted in the state db; a paused loop keeps collecting load but decides nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from epserve.placement_service.ack_board import BoardClosed
from epserve.placement_service.admin import AdminOps
from epserve.placement_service.errors import PlacementError, Unavailable
from epserve.placement_service.planner import predicted_balancedness, worth_applying
from epserve.placement_service.rebalancer import MapChange, Rebalancer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    action: str  # disabled | paused | waiting | busy | balanced | not_worth | unchanged | rebalanced | failed
    detail: str = ""
    version: int = 0  # the version in service afterwards (0 when not looked at)


class EplbLoop:
    def __init__(self, admin: AdminOps, rebalancer: Rebalancer) -> None:
        self.admin, self.rebalancer = admin, rebalancer
        self.controller = admin.controller
        self.config = admin.config
        self._wake = threading.Event()
        self.controller.on_load_report = self.notify
        self.decisions: list[Decision] = []  # recent, newest last (for tests and logs)

    # -- state -----------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.config.enable_eplb

    @property
    def paused(self) -> bool:
        return bool(self.controller.load_json("eplb_paused", False))

    def pause(self) -> None:
        """FailedPrecondition in a colocated deployment (nothing to rebalance)."""
        self.controller.check_has_placement()
        self.controller.save_json({"eplb_paused": True})

    def resume(self) -> None:
        self.controller.check_has_placement()
        self.controller.save_json({"eplb_paused": None})
        self.notify()

    # -- triggering ------------------------------------------------------------------------
    def notify(self) -> None:
        """Wake the rebalancer thread if a decision is due (cheap; called by ReportLoad)."""
        if self.enabled and not self.paused:
            _, passes = self.controller.load_window()
            if passes >= self.config.eplb_rebalance_num_iterations:
                self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """The rebalancer thread's body: resume an interrupted change, then decide when woken."""
        try:
            self.rebalancer.resume_interrupted()
        except (BoardClosed, PlacementError) as exc:
            if self.controller.is_closing:
                return
            logger.warning("could not resume the interrupted map change: %s", exc)
        while not stop.is_set():
            if not self._wake.wait(0.5):
                continue
            self._wake.clear()
            try:
                self.decide()
            except (BoardClosed, Unavailable):
                if self.controller.is_closing:
                    return
                logger.warning("EPLB decision skipped: placement unavailable", exc_info=True)

    # -- one decision ----------------------------------------------------------------------
    def decide(self) -> Decision:
        decision = self._decide()
        self.decisions = (self.decisions + [decision])[-100:]
        log = logger.info if decision.action in ("rebalanced", "failed", "not_worth", "balanced") else logger.debug
        log("EPLB: %s%s", decision.action, f" ({decision.detail})" if decision.detail else "")
        return decision

    def _decide(self) -> Decision:
        if not self.enabled:
            return Decision("disabled")
        if self.paused:
            return Decision("paused")
        weight, passes = self.controller.load_window()
        needed = self.config.eplb_rebalance_num_iterations
        if weight is None or passes < needed:
            return Decision("waiting", f"{passes}/{needed} passes")
        if self.rebalancer.in_progress:
            return Decision("busy", "a map change is running; the window stays open")
        self.controller.reset_load_window()
        weight = weight.double()
        current = self.controller.current_map()
        live, capacity = self.controller.slot_owner_states(current)
        before = predicted_balancedness(current.phy2log, weight, current.num_workers, capacity, live)
        threshold = self.config.eplb_min_rebalancing_utilization_threshold
        if before >= threshold:
            return Decision("balanced", f"balancedness {before:.3f} >= threshold {threshold:g}", current.version)
        skipped: list[Decision] = []

        def change(in_service) -> MapChange | None:
            plan = self.admin.plan_for(in_service, weight)
            num_slots = in_service.num_layers * in_service.num_physical_slots
            detail = (f"{plan.algorithm}: balancedness {plan.balancedness_before:.3f} → "
                      f"{plan.balancedness_after:.3f}, {plan.experts_moved}/{num_slots} slots change")
            if not worth_applying(plan, self.config.eplb_min_gain, num_slots):
                skipped.append(Decision("not_worth", detail + f" (--eplb-min-gain {self.config.eplb_min_gain:g})",
                                        in_service.version))
                return None
            skipped.append(Decision("rebalanced", detail))
            return MapChange("eplb", plan.phy2log, plan)

        try:
            result = self.rebalancer.apply("eplb", change)
        except PlacementError as exc:
            if isinstance(exc, Unavailable):
                raise
            return Decision("failed", str(exc), self.controller.current_map().version)
        if skipped and skipped[-1].action == "not_worth":
            return skipped[-1]
        if not result.num_versions:
            return Decision("unchanged", result.message, result.version)
        return Decision("rebalanced", f"{skipped[-1].detail}; version {result.previous_version} → "
                                      f"{result.version} in {result.duration_ms:.0f} ms", result.version)
