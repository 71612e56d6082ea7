"""EPLB: expert-parallel load balancing, as pure functions chosen by an enum.

Legend: L MoE layers, E logical experts, P physical slots (P = E + R redundant), G expert
groups, N nodes, W expert workers, S = P // W slots per worker (slot p on worker p // S).

``plan(weight [L, E], P, G, N, W, algorithm=...) -> phy2log [L, P]`` dispatches to one file
per algorithm; ``phy2log`` is the source of truth (``ExpertMap`` derives log2phy / logcnt).

- ``deepseek``: global replicate + balanced packing (deepseek.py).
- ``deepseek_hierarchical``: groups → nodes, replicate and pack inside nodes.
- ``elasticity_aware``: only live workers get experts; dead workers' slots are -1.
- ``movement_aware``: start from the previous map, change few slots (movement_aware.py).
- ``auto``: dead workers → elasticity_aware; else deepseek_hierarchical when num_groups is
  given and num_groups % num_nodes == 0 (as SGLang), else deepseek.

No algorithm falls back silently: a shape it cannot handle raises ValueError.
"""

from __future__ import annotations

import enum

import torch

from epserve.placement_service.eplb.common import balancedness, experts_moved, layer_balancedness
from epserve.placement_service.eplb.deepseek import plan_deepseek
from epserve.placement_service.eplb.deepseek_hierarchical import plan_deepseek_hierarchical
from epserve.placement_service.eplb.elasticity_aware import plan_elasticity_aware
from epserve.placement_service.eplb.movement_aware import plan_movement_aware

__all__ = ["EplbAlgorithm", "balancedness", "experts_moved", "layer_balancedness", "plan",
           "resolve_algorithm"]


class EplbAlgorithm(str, enum.Enum):
    """``--eplb-algorithm`` values."""

    auto = "auto"
    deepseek = "deepseek"
    deepseek_hierarchical = "deepseek_hierarchical"
    elasticity_aware = "elasticity_aware"
    movement_aware = "movement_aware"


def resolve_algorithm(algorithm: EplbAlgorithm | str, num_groups: int | None, num_nodes: int,
                      live_workers: torch.Tensor | None = None) -> EplbAlgorithm:
    """Turn ``auto`` into a concrete algorithm; others pass through (unknown names raise)."""
    try:
        algorithm = EplbAlgorithm(algorithm)
    except ValueError:
        names = ", ".join(a.value for a in EplbAlgorithm)
        raise ValueError(f"unknown EPLB algorithm {algorithm!r}; choose one of {names}") from None
    if algorithm is not EplbAlgorithm.auto:
        return algorithm
    if live_workers is not None and not bool(torch.as_tensor(live_workers).all()):
        return EplbAlgorithm.elasticity_aware
    if num_groups and num_nodes > 0 and num_groups % num_nodes == 0:
        return EplbAlgorithm.deepseek_hierarchical
    return EplbAlgorithm.deepseek


def plan(weight: torch.Tensor, num_replicas: int, num_groups: int | None, num_nodes: int,
         num_workers: int, *, algorithm: EplbAlgorithm | str = EplbAlgorithm.auto,
         previous_phy2log: torch.Tensor | None = None,
         worker_capacity: torch.Tensor | None = None,
         live_workers: torch.Tensor | None = None,
         tolerance: float = 0.01) -> torch.Tensor:
    """Plan a placement.

    weight [L, E] load per logical expert (token counts or rates); num_replicas = P;
    previous_phy2log [L, P] the map in service (movement_aware keeps it where it can);
    worker_capacity [W] relative speed (> 0); live_workers [W] bool; tolerance: how far
    above a from-scratch plan's max worker time movement_aware may stay (0.01 = 1%).
    Returns phy2log [L, P] int64 (-1 for slots of dead workers).
    """
    weight = torch.as_tensor(weight)
    chosen = resolve_algorithm(algorithm, num_groups, num_nodes, live_workers)
    if chosen is EplbAlgorithm.deepseek:
        return plan_deepseek(weight, num_replicas, num_workers, worker_capacity=worker_capacity,
                             live_workers=live_workers)
    if chosen is EplbAlgorithm.deepseek_hierarchical:
        return plan_deepseek_hierarchical(weight, num_replicas, num_groups, num_nodes, num_workers,
                                          worker_capacity=worker_capacity, live_workers=live_workers)
    if chosen is EplbAlgorithm.elasticity_aware:
        return plan_elasticity_aware(weight, num_replicas, num_workers, live_workers=live_workers,
                                     worker_capacity=worker_capacity)
    assert chosen is EplbAlgorithm.movement_aware, chosen
    return plan_movement_aware(weight, num_replicas, num_workers, previous_phy2log=previous_phy2log,
                               worker_capacity=worker_capacity, live_workers=live_workers,
                               tolerance=tolerance)
