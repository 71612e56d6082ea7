"""Elasticity-aware EPLB: place only on live workers, keep every logical expert covered.

Legend: L MoE layers, E logical experts, P physical slots, W workers, S = P // W.

The live workers' S * W_live slots get DeepSeek's global replicate-and-pack (capacity-aware
when capacities are given); the dead workers' slots are set to -1. Raises ValueError when
the live slots are fewer than E (some expert could not be served at all).
"""

from __future__ import annotations

import numpy as np
import torch

from epserve.placement_service.eplb.capacity_pack import replicate_and_pack
from epserve.placement_service.eplb.common import capacity_array, check_shapes, live_array


def plan_elasticity_aware(weight: torch.Tensor, num_replicas: int, num_workers: int, *,
                          live_workers: torch.Tensor | None = None,
                          worker_capacity: torch.Tensor | None = None) -> torch.Tensor:
    """weight [L, E], live_workers [W] bool → phy2log [L, P], dead workers' slots -1."""
    check_shapes(weight, num_replicas, num_workers)
    num_layers, num_logical = weight.shape
    live = live_array(live_workers, num_workers)
    cap = capacity_array(worker_capacity, num_workers)
    phy2log = elastic_plan_np(weight.detach().to(torch.float64).cpu().numpy(), num_replicas,
                              num_workers, live, None if worker_capacity is None else cap)
    return torch.from_numpy(phy2log)


def elastic_plan_np(weight: np.ndarray, num_replicas: int, num_workers: int, live: np.ndarray,
                    capacity: np.ndarray | None) -> np.ndarray:
    """numpy core shared with movement_aware: weight [L, E] → phy2log [L, P]."""
    num_layers, num_logical = weight.shape
    per = num_replicas // num_workers
    live_ids = np.flatnonzero(live)
    live_slots = per * len(live_ids)
    if live_slots < num_logical:
        raise ValueError(f"{len(live_ids)} live workers hold {live_slots} slots, fewer than the "
                         f"{num_logical} logical experts: add workers or slots per worker")
    live_cap = None if capacity is None else capacity[live_ids]
    packed = replicate_and_pack(weight, live_slots, len(live_ids), live_cap)  # [L, S * W_live]
    phy2log = np.full((num_layers, num_workers, per), -1, dtype=np.int64)
    phy2log[:, live_ids] = packed.reshape(num_layers, len(live_ids), per)
    return phy2log.reshape(num_layers, num_replicas)
