"""DeepSeek's global EPLB policy: replicate the heaviest experts, then balance-pack.

Legend: L MoE layers, E logical experts, P physical slots, W workers, S = P // W.

1. Replicate: each of the P - E redundant slots goes to the expert with the highest load per
   replica at that moment.
2. Pack: replicas in descending load order, each to the least loaded worker that still has a
   free slot, so every worker ends with exactly S slots.

Expert groups and nodes are ignored (DeepSeek uses this for decode, large EP). With
``worker_capacity`` (an epserve extension) a replica goes to the worker that would finish it
first instead, so faster workers take more load; without it this is DeepSeek's policy.
"""

from __future__ import annotations

import numpy as np
import torch

from epserve.placement_service.eplb.capacity_pack import replicate_and_pack
from epserve.placement_service.eplb.common import capacity_array, check_shapes, live_array


def plan_deepseek(weight: torch.Tensor, num_replicas: int, num_workers: int, *,
                  worker_capacity: torch.Tensor | None = None,
                  live_workers: torch.Tensor | None = None) -> torch.Tensor:
    """weight [L, E] load per logical expert → phy2log [L, P] (P = num_replicas), every slot filled (with
    capacities that differ, slots a slow worker is better without are -1)."""
    check_shapes(weight, num_replicas, num_workers)
    live = live_array(live_workers, num_workers)
    if not live.all():
        raise ValueError(f"deepseek places experts on every worker but workers "
                         f"{np.flatnonzero(~live).tolist()} are dead: use elasticity_aware or movement_aware")
    cap = None if worker_capacity is None else capacity_array(worker_capacity, num_workers)
    w = weight.detach().to(torch.float64).cpu().numpy()
    return torch.from_numpy(replicate_and_pack(w, num_replicas, num_workers, cap))
