"""The placement of map version 1, from ``--init-expert-location``.

Legend: L MoE layers, E logical experts, R redundant, P = E + R physical slots.

Read once at start-up (so a bad snapshot fails the launch, not the moment the last
expert worker registers); the slot owners are filled in when the workers are known.

Capacities: the expert workers' capacities are known only once they have registered. If they
differ, the controller re-plans version 1 with ``capacity_aware_phy2log`` from ``initial_load``
(the snapshot's counts, or uniform load for ``trivial``; a snapshot that gives its map is used
as is), so slower workers start with fewer and colder experts. The plan replaces the map only
when it is predicted faster (with uniform load and no redundant slots every placement is as
good as the trivial one, which then stays).
"""

from __future__ import annotations

import torch

from epserve.expert_map import ExpertMap
from epserve.placement_service import eplb
from epserve.placement_service.config import PlacementConfig


def initial_phy2log(config: PlacementConfig) -> torch.Tensor:
    """phy2log [L, P] for version 1. Raises ValueError when the snapshot does not fit the model."""
    num_layers, num_experts = config.model.num_moe_layers, config.model.num_experts
    if config.init_expert_location == "trivial":
        return ExpertMap.trivial(num_layers, num_experts, config.ep_num_redundant_experts).phy2log
    phy2log = _load_snapshot(config)
    expected = (num_layers, config.num_physical_slots)
    if tuple(phy2log.shape) != expected:
        raise ValueError(f"--init-expert-location {config.init_expert_location}: phy2log has shape "
                         f"{tuple(phy2log.shape)}, this deployment needs [L, E + R] = {list(expected)}")
    ExpertMap(phy2log, num_experts)  # validates coverage
    return phy2log


def initial_load(config: PlacementConfig) -> torch.Tensor | None:
    """load [L, E] version 1 may be re-planned from once capacities are known (module docstring);
    None when the snapshot gives its map."""
    if config.init_expert_location == "trivial":
        return torch.ones(config.model.num_moe_layers, config.model.num_experts, dtype=torch.float64)
    from epserve.placement_service import snapshot

    counts = snapshot.load_snapshot(config.init_expert_location)
    if counts.physical_to_logical_map is not None:
        return None
    return counts.logical_count.to(torch.float64)


def capacity_aware_phy2log(config: PlacementConfig, phy2log: torch.Tensor, load: torch.Tensor,
                           capacity: torch.Tensor) -> torch.Tensor:
    """phy2log [L, P], load [L, E], capacity [W] of the slot owners → phy2log [L, P] of version 1:
    the capacity-aware plan of ``load`` if it is predicted faster than ``phy2log``, else ``phy2log``."""
    num_workers = int(capacity.shape[0])
    planned = eplb.plan(load, config.num_physical_slots, config.num_groups or None, config.num_nodes, num_workers,
                        algorithm=config.eplb_algorithm, worker_capacity=capacity).to(torch.int64)
    before = eplb.balancedness(phy2log, load, num_workers, capacity)
    after = eplb.balancedness(planned, load, num_workers, capacity)
    return planned if after > before + 1e-9 else phy2log


def _load_snapshot(config: PlacementConfig) -> torch.Tensor:
    """The one call into placement_service.snapshot: a phy2log [L, P] as is, or planned from counts."""
    path = config.init_expert_location
    try:
        from epserve.placement_service import snapshot
    except ImportError as exc:
        if exc.name != "epserve.placement_service.snapshot":
            raise
        raise ValueError(f"--init-expert-location {path}: snapshot loading is not available in this "
                         "build (placement_service/snapshot.py); use --init-expert-location trivial") from exc
    return snapshot.placement_from_snapshot(
        snapshot.load_snapshot(path), num_layers=config.model.num_moe_layers,
        num_logical_experts=config.model.num_experts, num_physical_slots=config.num_physical_slots,
        num_workers=config.ep_size)
