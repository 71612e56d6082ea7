"""The placement of map version 1, from ``--init-expert-location``.

Legend: L MoE layers, E logical experts, R redundant, P = E + R physical slots.

Read once at start-up (so a bad snapshot fails the launch, not the moment the last
expert worker registers); the slot owners are filled in when the workers are known.
"""

from __future__ import annotations

import torch

from epserve.expert_map import ExpertMap
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
