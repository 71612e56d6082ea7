"""The placement vocabulary shared by the placement service and its workers' client: worker roles,
worker states and map-update phases (values equal ``protos/placement.proto``'s enums),
``WorkerInfo`` and ``DataPlaneInfo``, and their proto converters. No I/O, no threads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from epserve.protos import placement_pb2


class WorkerRole(enum.IntEnum):
    """Values equal protos.placement_pb2.WorkerRole."""
    ATTENTION = 1
    EXPERT = 2


class WorkerState(enum.IntEnum):
    """Values equal protos.placement_pb2.WorkerState."""
    ALIVE = 1
    SUSPECT = 2  # missed heartbeats
    DEAD = 3
    DRAINING = 4


class UpdatePhase(enum.IntEnum):
    """Values equal protos.placement_pb2.UpdatePhase."""
    COMMIT = 1
    PREPARE = 2
    RETIRE = 3
    ROLLBACK = 4


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: WorkerRole
    address: str
    rank: int
    state: WorkerState
    capacity: float = 1.0
    device: str = ""
    last_heartbeat_unix_ms: int = 0
    map_version: int = 0  # the map version the worker last acked


@dataclass(frozen=True)
class DataPlaneInfo:
    """How the data plane is wired: every worker joins one group of world_size ranks."""
    backend: str
    dist_init_addr: str  # host:port of the rendezvous store
    world_size: int
    workers: tuple[WorkerInfo, ...] = field(default=())  # by rank, attention ranks first


def worker_info_to_proto(info: WorkerInfo) -> placement_pb2.WorkerInfo:
    return placement_pb2.WorkerInfo(
        worker_id=info.worker_id, role=int(info.role), address=info.address, rank=info.rank,
        state=int(info.state), capacity=info.capacity, device=info.device,
        last_heartbeat_unix_ms=info.last_heartbeat_unix_ms, map_version=info.map_version)


def worker_info_from_proto(message: placement_pb2.WorkerInfo) -> WorkerInfo:
    return WorkerInfo(message.worker_id, WorkerRole(message.role), message.address, message.rank,
                      WorkerState(message.state), message.capacity, message.device,
                      message.last_heartbeat_unix_ms, message.map_version)


def data_plane_to_proto(info: DataPlaneInfo) -> placement_pb2.DataPlaneInfo:
    return placement_pb2.DataPlaneInfo(backend=info.backend, dist_init_addr=info.dist_init_addr,
                                       world_size=info.world_size,
                                       workers=[worker_info_to_proto(w) for w in info.workers])


def data_plane_from_proto(message: placement_pb2.DataPlaneInfo) -> DataPlaneInfo:
    return DataPlaneInfo(message.backend, message.dist_init_addr, message.world_size,
                         tuple(worker_info_from_proto(w) for w in message.workers))
