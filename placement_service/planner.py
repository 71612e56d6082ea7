"""Rebalance planning: the EPLB algorithms wrapped with what the service needs to decide.

Legend: L MoE layers, E logical experts, P physical slots (P' after a redundancy change),
W expert workers, S = P // W.

``plan_rebalance`` is a pure function (tensors in, a ``RebalancePlan`` out): it runs the
chosen ``placement_service.eplb`` algorithm on a load [L, E], keeps layers the caller did
not ask for as they are, relabels global plans so experts stay on the workers that already
hold them (same per-worker expert sets, so the same balancedness, fewer weights to load),
and measures the plan against the current map under the same load model (a logical
expert's load spread evenly over its replicas): balancedness before and after, (layer,
slot) entries changed, bytes to load.

``worth_applying`` is the EPLB loop's gain rule (see docs/operations.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from epserve.placement_service import eplb
from epserve.placement_service.eplb.common import align_to_previous


@dataclass(frozen=True)
class PlanSettings:
    """How to plan: algorithm and topology (from PlacementConfig or an admin request)."""
    algorithm: str = "auto"
    num_groups: int = 0  # 0 = none
    num_nodes: int = 1
    expert_bytes: int = 0  # bytes of one expert's weights (3 * D * I * dtype size)


@dataclass(frozen=True)
class RebalancePlan:
    phy2log: torch.Tensor  # [L, P'] the target placement
    algorithm: str  # resolved (never "auto")
    balancedness_before: float
    balancedness_after: float
    experts_moved: int  # (layer, slot) entries whose expert changes; see ``count_moved``
    bytes_moved: int
    plan_ms: float
    changed_layers: tuple[int, ...]

    @property
    def gain(self) -> float:
        return self.balancedness_after - self.balancedness_before


def plan_rebalance(weight: torch.Tensor, current_phy2log: torch.Tensor, num_workers: int,
                   settings: PlanSettings, *, num_physical_slots: int | None = None,
                   live_workers: torch.Tensor | None = None, worker_capacity: torch.Tensor | None = None,
                   layers: list[int] | None = None) -> RebalancePlan:
    """weight [L, E] load per logical expert; current_phy2log [L, P]; live_workers [W] bool
    (False = no slots for that worker: drained or dead); worker_capacity [W] or None;
    layers: the MoE layers to re-plan (None = all). Raises ValueError when the algorithm
    cannot plan this shape (the message says what to change)."""
    start = time.perf_counter()
    weight = torch.as_tensor(weight, dtype=torch.float64)
    num_layers, num_slots = current_phy2log.shape
    target_slots = num_physical_slots or num_slots
    if layers is not None and target_slots != num_slots:
        raise ValueError("a slot-count change re-plans every layer; do not pass layers")
    algorithm = eplb.resolve_algorithm(settings.algorithm, settings.num_groups or None, settings.num_nodes,
                                       live_workers)
    same_shape = target_slots == num_slots
    phy2log = eplb.plan(weight, target_slots, settings.num_groups or None, settings.num_nodes, num_workers,
                        algorithm=algorithm, previous_phy2log=current_phy2log if same_shape else None,
                        worker_capacity=worker_capacity, live_workers=live_workers).to(torch.int64)
    if same_shape and algorithm is not eplb.EplbAlgorithm.movement_aware:
        phy2log = _keep_in_place(phy2log, current_phy2log, num_workers, settings, algorithm,
                                 worker_capacity, live_workers)
    if layers is not None:
        keep = torch.ones(num_layers, dtype=torch.bool)
        keep[layers] = False
        phy2log[keep] = current_phy2log[keep]
    plan_ms = (time.perf_counter() - start) * 1000
    moved = count_moved(current_phy2log, phy2log, num_workers)
    if same_shape:
        changed = tuple(int(i) for i in (phy2log != current_phy2log).any(dim=1).nonzero().flatten())
    else:
        changed = tuple(range(num_layers))
    return RebalancePlan(
        phy2log=phy2log, algorithm=algorithm.value,
        balancedness_before=predicted_balancedness(current_phy2log, weight, num_workers, worker_capacity,
                                                   live_workers),
        balancedness_after=predicted_balancedness(phy2log, weight, num_workers, worker_capacity, live_workers),
        experts_moved=moved, bytes_moved=moved * settings.expert_bytes, plan_ms=plan_ms, changed_layers=changed)


def measure_change(weight: torch.Tensor | None, current_phy2log: torch.Tensor, target_phy2log: torch.Tensor,
                   num_workers: int, expert_bytes: int, num_logical: int) -> RebalancePlan:
    """A ``RebalancePlan`` for a target given from outside (snapshot import, rollback); without
    load, balancedness is measured under uniform load."""
    num_layers = current_phy2log.shape[0]
    if weight is None:
        weight = torch.ones(num_layers, num_logical, dtype=torch.float64)
    moved = count_moved(current_phy2log, target_phy2log, num_workers)
    if current_phy2log.shape == target_phy2log.shape:
        changed = tuple(int(i) for i in (target_phy2log != current_phy2log).any(dim=1).nonzero().flatten())
    else:
        changed = tuple(range(num_layers))
    return RebalancePlan(target_phy2log, "", predicted_balancedness(current_phy2log, weight, num_workers),
                         predicted_balancedness(target_phy2log, weight, num_workers), moved, moved * expert_bytes,
                         0.0, changed)


def predicted_balancedness(phy2log: torch.Tensor, weight: torch.Tensor | None, num_workers: int,
                           worker_capacity: torch.Tensor | None = None,
                           live_workers: torch.Tensor | None = None) -> float:
    """Mean over layers of ideal / max worker time under ``weight`` [L, E]; 1.0 without load.
    Workers counted: ``live_workers`` when given, else those holding experts."""
    if weight is None or float(weight.sum()) == 0:
        return 1.0
    live = live_workers
    if live is not None and bool(torch.as_tensor(live).all()):
        live = None
    return eplb.balancedness(phy2log, weight.to(torch.float64), num_workers, worker_capacity, live)


def count_moved(previous_phy2log: torch.Tensor, phy2log: torch.Tensor, num_workers: int) -> int:
    """Same shape: (layer, slot) entries whose expert changes (``eplb.experts_moved``). Another
    slot count: replicas a worker must load, i.e. per (layer, worker) the new expert multiset
    minus the old one."""
    if previous_phy2log.shape == phy2log.shape:
        return eplb.experts_moved(previous_phy2log, phy2log)
    num_layers = phy2log.shape[0]
    num_ids = int(max(previous_phy2log.max(), phy2log.max())) + 2

    def histogram(table: torch.Tensor) -> np.ndarray:  # [L, W, E + 1] replicas per worker
        per = table.shape[1] // num_workers
        cells = (table.reshape(num_layers, num_workers, per) + 1).numpy()
        offsets = (np.arange(num_layers)[:, None, None] * num_workers + np.arange(num_workers)[None, :, None]) * num_ids
        counts = np.bincount((cells + offsets).reshape(-1), minlength=num_layers * num_workers * num_ids)
        return counts.reshape(num_layers, num_workers, num_ids)[..., 1:]  # empty slots (-1) need nothing

    return int(np.maximum(histogram(phy2log) - histogram(previous_phy2log), 0).sum())


def worth_applying(plan: RebalancePlan, min_gain: float, num_slots: int) -> bool:
    """The EPLB loop's gain rule: apply a plan only when it predicts a gain (> 0) of at least
    ``min_gain`` × the share of the L × P slots it changes. Moving everything must gain
    ``min_gain``; moving a tenth of the slots, a tenth of it."""
    if plan.experts_moved == 0 or plan.gain <= 0:
        return False
    share = plan.experts_moved / max(num_slots, 1)
    return plan.gain >= min_gain * share - 1e-12


def _keep_in_place(phy2log: torch.Tensor, previous: torch.Tensor, num_workers: int, settings: PlanSettings,
                   algorithm: eplb.EplbAlgorithm, worker_capacity: torch.Tensor | None,
                   live_workers: torch.Tensor | None) -> torch.Tensor:
    """Relabel interchangeable workers (same capacity, liveness and, for hierarchical plans,
    node) and slots inside a worker so as many experts as possible stay where they are."""
    capacity = (torch.ones(num_workers, dtype=torch.float64) if worker_capacity is None
                else torch.as_tensor(worker_capacity, dtype=torch.float64))
    live = torch.ones(num_workers, dtype=torch.bool) if live_workers is None else torch.as_tensor(live_workers)
    node = torch.zeros(num_workers, dtype=torch.int64)
    if algorithm is eplb.EplbAlgorithm.deepseek_hierarchical:
        node = torch.arange(num_workers) // (num_workers // settings.num_nodes)
    keys = list(zip(capacity.tolist(), live.tolist(), node.tolist()))
    classes = {key: index for index, key in enumerate(dict.fromkeys(keys))}
    worker_class = np.array([classes[key] for key in keys], dtype=np.int64)
    aligned = align_to_previous(phy2log.numpy(), previous.to(torch.int64).numpy(), num_workers, worker_class)
    return torch.from_numpy(aligned)
