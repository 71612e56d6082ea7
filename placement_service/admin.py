"""AdminOps: the PlacementAdmin operations as plain methods (the servicer only converts).

Legend: L MoE layers, E logical experts, R redundant, P = E + R physical slots, W expert workers.

Each operation checks its request (InvalidArgument naming the field, NotFound for unknown
workers / versions, FailedPrecondition for a snapshot of another model or a plan that
cannot be made), then hands a target to the ``Rebalancer``, which applies it make-before-
break — so on any error before the first commit the map in service is untouched.

Requests are bounded before any work: redundancy at most E × (W - 1) (beyond that some expert would
have two replicas on one worker: memory spent for nothing), snapshots of the deployment's own shape
(L layers, E experts, the P slots in service: change P with SetRedundancy), snapshot JSON at most
MAX_SNAPSHOT_BYTES and MAX_JSON_DEPTH deep, worker ids at most MAX_ID_CHARS; messages quote request
strings clipped (``grpc_guard.clip``), never whole.

Load used for planning: the EPLB window (since the last EPLB decision) when it holds any
tokens, else everything reported since start-up. Rebalance and PlanRebalance need load;
SetRedundancy and DrainWorker plan from uniform load when none was reported.

A colocated deployment (``--moe-a2a-backend local``) has no map: every operation on it raises
FailedPrecondition (``PlacementController.check_has_placement``) before looking at its request.

``dump_expert_distribution`` changes nothing: it asks the attention workers to write what their
expert-load recorders kept (``expert_dump.py``).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from epserve.expert_map import ExpertMap
from epserve.grpc_guard import clip
from epserve.placement_types import WorkerRole, WorkerState
from epserve.placement_service import snapshot
from epserve.placement_service.config import EPLB_ALGORITHMS
from epserve.placement_service.controller import PlacementController
from epserve.placement_service.expert_dump import WorkerDump, check_request, dump_on_workers, dump_targets
from epserve.placement_service.errors import FailedPrecondition, InvalidArgument
from epserve.placement_service.planner import (PlanSettings, RebalancePlan, measure_change, plan_rebalance,
                                       predicted_balancedness)
from epserve.placement_service.rebalancer import ChangeResult, MapChange, Rebalancer

MAX_SNAPSHOT_BYTES = 64 << 20
MAX_JSON_DEPTH = 32          # a snapshot nests 3 deep; RecursionError (UNKNOWN) came at a few thousand
MAX_ID_CHARS = 256


@dataclass(frozen=True)
class PlacementStatus:
    """What GetPlacement adds to the map: EPLB's view and map-change counters."""
    window_balancedness: float
    window_num_passes: int
    rebalance_in_progress: bool
    num_rebalances: int
    num_rollbacks: int
    last_rebalance_ms: float
    last_operation: str


class AdminOps:
    def __init__(self, controller: PlacementController, rebalancer: Rebalancer) -> None:
        self.controller, self.rebalancer = controller, rebalancer
        self.config = controller.config
        self.model = controller.config.model
        self.expert_bytes = self.model.expert_bytes(self.config.eplb_expert_dtype_bytes)

    def status(self, expert_map: ExpertMap) -> PlacementStatus:
        window, passes = self.controller.load_window()
        live, capacity = self.controller.slot_owner_states(expert_map)
        return PlacementStatus(
            window_balancedness=predicted_balancedness(expert_map.phy2log, window, expert_map.num_workers,
                                                       capacity, live),
            window_num_passes=passes, rebalance_in_progress=self.rebalancer.in_progress,
            num_rebalances=self.controller.stat("num_rebalances"), num_rollbacks=self.controller.stat("num_rollbacks"),
            last_rebalance_ms=float(self.controller.load_json("last_rebalance_ms", 0.0)),
            last_operation=self.controller.version_meta(expert_map.version)[0])

    # -- planning --------------------------------------------------------------------------
    def plan(self, algorithm: str = "", layers: list[int] | None = None) -> RebalancePlan:
        """Dry run: what Rebalance would do now."""
        self.controller.check_has_placement()
        _check_algorithm(algorithm)
        current = self.controller.current_map()
        layers = _check_layers(layers, current.num_layers)
        return self.plan_for(current, self.load(required=True), algorithm, layers)

    def plan_for(self, current: ExpertMap, weight: torch.Tensor, algorithm: str = "",
                 layers: list[int] | None = None, num_physical_slots: int | None = None,
                 exclude: tuple[str, ...] = ()) -> RebalancePlan:
        """Plan against ``current`` for load ``weight`` [L, E]; ``exclude``: workers to empty."""
        live, capacity = self.controller.slot_owner_states(current)
        for worker_id in exclude:
            live[current.slot_owners.index(worker_id)] = False
        settings = PlanSettings(algorithm or self.config.eplb_algorithm, self.config.num_groups,
                                self.config.num_nodes, self.expert_bytes)
        try:
            return plan_rebalance(weight, current.phy2log, current.num_workers, settings,
                                  num_physical_slots=num_physical_slots, live_workers=live,
                                  worker_capacity=capacity, layers=layers)
        except ValueError as exc:
            raise FailedPrecondition(f"cannot plan: {exc}") from None

    def load(self, required: bool) -> torch.Tensor | None:
        """Load per logical expert [L, E] to plan with (see the module docstring)."""
        window, _ = self.controller.load_window()
        if window is not None and int(window.sum()) > 0:
            return window.to(torch.float64)
        total = self.controller.load_total()
        if total is not None and int(total.sum()) > 0:
            return total.to(torch.float64)
        if required:
            raise FailedPrecondition("no expert load has been reported yet: serve some traffic first "
                                     "(attention workers report every --load-report-interval-s)")
        return None

    def _uniform_or_load(self) -> torch.Tensor:
        load = self.load(required=False)
        return load if load is not None else torch.ones(self.model.num_moe_layers, self.model.num_experts,
                                                        dtype=torch.float64)

    # -- map changes -----------------------------------------------------------------------
    def rebalance(self, algorithm: str = "", layers: list[int] | None = None) -> ChangeResult:
        self.controller.check_has_placement()
        _check_algorithm(algorithm)
        self.controller.current_map()  # Unavailable before the first map
        weight = self.load(required=True)

        def change(current: ExpertMap) -> MapChange:
            plan = self.plan_for(current, weight, algorithm, _check_layers(layers, current.num_layers))
            return MapChange("rebalance", plan.phy2log, plan)

        return self.rebalancer.apply("rebalance", change)

    def set_redundancy(self, num_redundant: int) -> ChangeResult:
        self.controller.check_has_placement()
        num_experts = self.model.num_experts
        if num_redundant < 0:
            raise InvalidArgument(f"num_redundant_experts must be >= 0, got {num_redundant}")
        weight = self._uniform_or_load()

        def change(current: ExpertMap) -> MapChange | None:
            num_slots, num_workers = num_experts + num_redundant, current.num_workers
            most = num_experts * (num_workers - 1)
            if num_redundant > most:
                raise InvalidArgument(
                    f"num_redundant_experts {num_redundant} is more than {most} = {num_experts} experts × "
                    f"({num_workers} expert workers - 1): with that many some expert would have two replicas on "
                    f"one worker; each redundant slot holds {self.model.num_moe_layers} layers of one expert "
                    f"({self.expert_bytes * self.model.num_moe_layers / 2**20:.1f} MiB) on its worker")
            if num_slots % num_workers:
                raise InvalidArgument(
                    f"num_redundant_experts {num_redundant}: {num_experts} experts + {num_redundant} = {num_slots} "
                    f"slots do not split evenly over {num_workers} expert workers; choose a value with "
                    f"(E + R) % {num_workers} == 0, e.g. {num_redundant + (-num_slots) % num_workers}")
            if num_slots == current.num_physical_slots:
                return None
            plan = self.plan_for(current, weight, num_physical_slots=num_slots)
            return MapChange("set_redundancy", plan.phy2log, plan)

        return self.rebalancer.apply("set_redundancy", change)

    def rollback(self) -> ChangeResult:
        """Back to the map in service before the operation that made the current version (all
        its chunks), as a make-before-break change to a new version number. Rollbacks walk
        back: rolling back a rollback goes one operation further, not forward again."""
        self.controller.check_has_placement()

        def change(current: ExpertMap) -> MapChange:
            operation, back_to = self.controller.version_meta(current.version)
            if not operation:  # a version from before operations were recorded
                versions = self.controller.get_placement(0)[2]
                back_to = versions[-2] if len(versions) > 1 else 0
            if not back_to:
                raise FailedPrecondition(f"version {current.version} is the initial map (or was rolled back to "
                                         "it); there is no earlier version to roll back to")
            target = self.controller.get_placement(back_to)[0]
            plan = measure_change(self.load(required=False), current.phy2log, target.phy2log, current.num_workers,
                                  self.expert_bytes, current.num_logical_experts)
            return MapChange("rollback", target.phy2log, plan, rollback_to=self.controller.version_meta(back_to)[1])

        return self.rebalancer.apply("rollback", change)

    def drain(self, worker_id: str) -> ChangeResult:
        self.controller.check_has_placement()
        if len(worker_id) > MAX_ID_CHARS:
            raise InvalidArgument(f"worker_id is {len(worker_id)} characters long; worker ids have at most "
                                  f"{MAX_ID_CHARS}")
        info = self.controller.worker(worker_id)  # NotFound
        if info.role != WorkerRole.EXPERT:
            raise InvalidArgument(f"worker {worker_id} is an attention worker; only expert workers hold slots")
        if info.state == WorkerState.DRAINING:
            raise FailedPrecondition(f"expert worker {worker_id} is already drained")
        weight = self._uniform_or_load()

        def change(current: ExpertMap) -> MapChange:
            plan = self.plan_for(current, weight, "elasticity_aware", exclude=(worker_id,))
            return MapChange("drain", plan.phy2log, plan, drain=(worker_id,))

        return self.rebalancer.apply("drain", change, detail=f"drain {worker_id}")

    # -- expert distribution ---------------------------------------------------------------
    def dump_expert_distribution(self, directory: str, worker_timeout_s: float = 0.0) -> list[WorkerDump]:
        """Every live attention worker writes its recorded expert distribution under ``directory``
        (on its own machine); one result per worker, failures included. InvalidArgument for a bad
        directory, Unavailable when no attention worker is live."""
        timeout_s = check_request(directory, worker_timeout_s)
        return dump_on_workers(dump_targets(self.controller.list_workers()), directory, timeout_s,
                               self.config.security)

    # -- snapshots -------------------------------------------------------------------------
    def export_snapshot(self) -> str:
        """The current map (and load since start-up, if any) in the --init-expert-location JSON format."""
        self.controller.check_has_placement()
        current = self.controller.current_map()
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "snapshot.json"
            snapshot.save_snapshot(path, num_logical_experts=current.num_logical_experts,
                                   physical_to_logical_map=current.phy2log, logical_count=self.controller.load_total(),
                                   model_name=self.model.snapshot_name)
            return path.read_text()

    def import_snapshot(self, text: str) -> ChangeResult:
        """Apply a snapshot's map as is, or a plan from its logical_count. Another model's
        snapshot → FailedPrecondition; malformed content → InvalidArgument."""
        self.controller.check_has_placement()
        loaded = _parse_snapshot(text)
        num_layers, num_experts = self.model.num_moe_layers, self.model.num_experts
        for field, theirs, ours in (("num_layers", loaded.num_layers, num_layers),
                                    ("num_logical_experts", loaded.num_logical_experts, num_experts),
                                    ("model_name", loaded.model_name, self.model.snapshot_name)):
            if theirs is not None and theirs != ours:
                raise FailedPrecondition(f"the snapshot is of another model: its {field} is {theirs!r}, this "
                                         f"deployment's is {ours!r}")

        def change(current: ExpertMap) -> MapChange:
            phy2log = loaded.physical_to_logical_map
            num_slots = None if phy2log is None else phy2log.shape[1]
            if num_slots is not None and num_slots != current.num_physical_slots:
                raise InvalidArgument(f"physical_to_logical_map has {num_slots} slots per layer; the map in service "
                                      f"has {current.num_physical_slots} (change that with SetRedundancy first)")
            try:
                loaded.validate(num_layers=num_layers, num_logical_experts=num_experts, num_physical_slots=num_slots)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            if phy2log is not None:
                plan = measure_change(self.load(required=False), current.phy2log, phy2log, current.num_workers,
                                      self.expert_bytes, num_experts)
                return MapChange("import", phy2log, plan)
            plan = self.plan_for(current, loaded.logical_count)
            return MapChange("import", plan.phy2log, plan)

        return self.rebalancer.apply("import", change)


def _parse_snapshot(text: str) -> snapshot.ExpertSnapshot:
    """snapshot.py's own loader on the request's JSON (one format, one parser)."""
    if len(text) > MAX_SNAPSHOT_BYTES:
        raise InvalidArgument(f"snapshot json is {len(text)} characters; at most {MAX_SNAPSHOT_BYTES}")
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise InvalidArgument(f"snapshot json nests deeper than {MAX_JSON_DEPTH} levels; a snapshot nests 3")
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"snapshot json is not valid JSON: {clip(str(exc), 200)}") from None
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "request.json"
        path.write_text(text)
        try:
            loaded = snapshot.load_snapshot(path)
        except ValueError as exc:
            raise InvalidArgument(str(exc).replace(str(path), "(request)")) from None
    return loaded


def _json_depth(text: str) -> int:
    """How deep ``[``/``{`` nest in ``text`` (brackets inside strings count too: an upper bound), in C speed:
    drop everything but brackets, then peel the innermost pairs until none are left."""
    brackets = _NOT_BRACKETS.sub("", text)
    depth = 0
    while brackets:
        shorter = _INNERMOST.sub("", brackets)       # one level per pass (the result is not rescanned)
        if len(shorter) == len(brackets):        # unbalanced: what is left nests at least this deep
            return depth + len(shorter)
        brackets, depth = shorter, depth + 1
        if depth > MAX_JSON_DEPTH:
            return depth
    return depth


_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"[\[{][\]}]")


def _check_algorithm(algorithm: str) -> None:
    if algorithm and algorithm not in EPLB_ALGORITHMS:
        raise InvalidArgument(f"algorithm {clip(algorithm, 64)!r} is unknown; choose one of {', '.join(EPLB_ALGORITHMS)} "
                              "(empty = the service's --eplb-algorithm)")


def _check_layers(layers: list[int] | None, num_layers: int) -> list[int] | None:
    if not layers:
        return None
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise InvalidArgument(f"layers {clip(str(bad), 200)} are out of range: the model has {num_layers} MoE layers "
                              f"(0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise InvalidArgument(f"layers {clip(str(list(layers)), 200)} holds duplicates")
    return sorted(layers)
