"""DeepSeek's hierarchical EPLB policy: groups onto nodes, replicate inside nodes, pack onto workers.

Legend: L MoE layers, E logical experts, G expert groups (E % G == 0), N nodes (G % N == 0,
W % N == 0), P physical slots, W workers, S = P // W.

1. Pack the G expert groups onto the N nodes by group load, G / N groups per node, so all
   replicas of a group's experts live on one node (group-limited routing then keeps a
   token's traffic inside few nodes).
2. Inside each node, replicate its E / N experts into its P / N slots (DeepSeek's rule).
3. Pack each node's replicas onto its W / N workers, S slots each.

DeepSeek uses it for prefill (smaller EP). It never falls back to the global policy: a
shape that does not fit raises ValueError saying what to change.
"""

from __future__ import annotations

import numpy as np
import torch

from epserve.placement_service.eplb.capacity_pack import replicate_and_pack
from epserve.placement_service.eplb.common import balanced_pack, capacity_array, check_shapes, live_array


def check_hierarchy(num_logical: int, num_replicas: int, num_groups: int | None, num_nodes: int,
                    num_workers: int) -> None:
    """Raise ValueError unless the hierarchical policy fits this shape."""
    if not num_groups or num_groups <= 0:
        raise ValueError("deepseek_hierarchical needs num_groups (the model's expert groups, e.g. "
                         "8 for DeepSeek-V3); pass --num-groups or use --eplb-algorithm deepseek")
    if num_nodes <= 0:
        raise ValueError(f"num_nodes must be positive, got {num_nodes}")
    if num_logical % num_groups != 0:
        raise ValueError(f"{num_logical} logical experts do not split into {num_groups} groups: "
                         "num_groups must divide the expert count")
    if num_groups % num_nodes != 0:
        raise ValueError(f"{num_groups} expert groups do not split over {num_nodes} nodes: use a "
                         f"node count dividing {num_groups}, or --eplb-algorithm deepseek")
    if num_workers % num_nodes != 0:
        raise ValueError(f"{num_workers} workers do not split over {num_nodes} nodes: use a node "
                         f"count dividing {num_workers}, or --eplb-algorithm deepseek")


def plan_deepseek_hierarchical(weight: torch.Tensor, num_replicas: int, num_groups: int | None,
                               num_nodes: int, num_workers: int, *,
                               worker_capacity: torch.Tensor | None = None,
                               live_workers: torch.Tensor | None = None) -> torch.Tensor:
    """weight [L, E] → phy2log [L, P]; node n owns slots [n * P / N, (n + 1) * P / N)."""
    check_shapes(weight, num_replicas, num_workers)
    num_layers, num_logical = weight.shape
    check_hierarchy(num_logical, num_replicas, num_groups, num_nodes, num_workers)
    live = live_array(live_workers, num_workers)
    if not live.all():
        raise ValueError(f"deepseek_hierarchical places experts on every worker but workers "
                         f"{np.flatnonzero(~live).tolist()} are dead: use elasticity_aware or movement_aware")
    cap = capacity_array(worker_capacity, num_workers)
    w = weight.detach().to(torch.float64).cpu().numpy()
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_replicas // num_nodes
    workers_per_node = num_workers // num_nodes

    # 1. groups → nodes
    group_load = w.reshape(num_layers, num_groups, group_size).sum(-1)  # [L, G]
    node_cap = cap.reshape(num_nodes, workers_per_node).sum(-1)  # [N]
    group_node, group_rank = balanced_pack(group_load, num_nodes,
                                           None if worker_capacity is None else node_cap)
    # node-major order of experts: position of expert e = (node, rank in node, index in group)
    group_pos = group_node * groups_per_node + group_rank  # [L, G]
    expert_pos = (group_pos[:, :, None] * group_size + np.arange(group_size)).reshape(num_layers, num_logical)
    expert_at = np.empty_like(expert_pos)  # [L, E] logical id at each node-major position
    np.put_along_axis(expert_at, expert_pos, np.broadcast_to(np.arange(num_logical), expert_pos.shape), 1)

    # 2 + 3. replicate and pack inside each node: rows are (layer, node)
    node_weight = np.take_along_axis(w, expert_at, 1).reshape(num_layers * num_nodes, experts_per_node)
    row_cap = None
    if worker_capacity is not None:
        row_cap = np.tile(cap.reshape(num_nodes, workers_per_node), (num_layers, 1))  # [L*N, W/N]
    local = replicate_and_pack(node_weight, slots_per_node, workers_per_node, row_cap)  # [L*N, P/N]
    node_offset = (np.arange(num_nodes) * experts_per_node)[None, :, None]
    positions = (local.reshape(num_layers, num_nodes, slots_per_node) + node_offset).reshape(num_layers, num_replicas)
    phy2log = np.take_along_axis(expert_at, np.maximum(positions, 0), 1)
    phy2log[local.reshape(num_layers, num_replicas) < 0] = -1       # empty slots (workers of unequal capacity)
    return torch.from_numpy(phy2log)
