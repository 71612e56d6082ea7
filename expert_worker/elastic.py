"""Elastic EP on an expert worker: when a map change is urgent, and when a drained worker leaves.

Legend: L MoE layers, E logical experts, W expert workers (slot owners).

- ``urgent``: the map in service (the last COMMIT this worker got) leaves some expert without a
  replica on a live worker (placement's routing-only version around a lost worker keeps such an
  expert where it was): the next PREPARE is the reload requests are waiting for, so it loads at
  full speed instead of ``--expert-load-duty-cycle``.
- ``drained_out``: RETIRE of a version that gives this worker no slot while placement lists it
  DRAINING — no attention worker routes to it any more (RETIRE comes once every one of them
  switched), so it can exit with nothing in flight.
"""

from __future__ import annotations

import torch

from epserve import elastic_map
from epserve.expert_map import ExpertMap
from epserve.placement_types import DataPlaneInfo, WorkerState


def live_owners(expert_map: ExpertMap, data_plane: DataPlaneInfo) -> torch.Tensor:
    """[W] bool: slot owners placement lists neither DEAD nor DRAINING."""
    state = {w.worker_id: w.state for w in data_plane.workers}
    return torch.tensor([state.get(owner) in (WorkerState.ALIVE, WorkerState.SUSPECT)
                         for owner in expert_map.slot_owners])


def urgent(serving: ExpertMap | None, data_plane: DataPlaneInfo) -> bool:
    if serving is None or not serving.slot_owners:
        return False
    live = live_owners(serving, data_plane)
    return bool(elastic_map.uncovered(serving.phy2log, live, serving.num_logical_experts).any())


def drained_out(worker_id: str, expert_map: ExpertMap, data_plane: DataPlaneInfo) -> bool:
    me = next((w for w in data_plane.workers if w.worker_id == worker_id), None)
    if me is None or me.state != WorkerState.DRAINING:
        return False
    if worker_id not in expert_map.slot_owners:
        return True
    slots = expert_map.slots_of_worker(worker_id)
    return bool((expert_map.phy2log[:, slots.start:slots.stop] < 0).all())
