"""ExpertMap ↔ protos.placement_pb2.ExpertMap: the one conversion in each direction.

On receipt the derived fields (log2phy, logcnt, checksum) are checked against what the
map derives from phy2log, so a corrupted or mismatched message is refused loudly.
"""

from __future__ import annotations

import torch

from epserve.expert_map import ExpertMap
from epserve.protos import placement_pb2


def expert_map_to_proto(expert_map: ExpertMap) -> placement_pb2.ExpertMap:
    return placement_pb2.ExpertMap(
        version=expert_map.version,
        num_layers=expert_map.num_layers,
        num_logical_experts=expert_map.num_logical_experts,
        num_physical_slots=expert_map.num_physical_slots,
        phy2log=expert_map.phy2log.flatten().tolist(),
        max_replicas=expert_map.log2phy.shape[2],
        log2phy=expert_map.log2phy.flatten().tolist(),
        logcnt=expert_map.logcnt.flatten().tolist(),
        slot_owners=list(expert_map.slot_owners),
        checksum=expert_map.checksum,
    )


def expert_map_from_proto(message: placement_pb2.ExpertMap) -> ExpertMap:
    """Raises ValueError naming the field when the message is inconsistent."""
    num_layers, num_slots = message.num_layers, message.num_physical_slots
    if len(message.phy2log) != num_layers * num_slots:
        raise ValueError(f"phy2log has {len(message.phy2log)} entries, expected num_layers * "
                         f"num_physical_slots = {num_layers} * {num_slots}")
    phy2log = torch.tensor(list(message.phy2log), dtype=torch.int64).reshape(num_layers, num_slots)
    expert_map = ExpertMap(phy2log, message.num_logical_experts, message.version, tuple(message.slot_owners))
    if message.logcnt and list(message.logcnt) != expert_map.logcnt.flatten().tolist():
        raise ValueError("logcnt does not match phy2log")
    if message.log2phy and (message.max_replicas != expert_map.log2phy.shape[2]
                            or list(message.log2phy) != expert_map.log2phy.flatten().tolist()):
        raise ValueError("log2phy does not match phy2log")
    if message.checksum and message.checksum != expert_map.checksum:
        raise ValueError(f"checksum {message.checksum} does not match the map's {expert_map.checksum}")
    return expert_map
