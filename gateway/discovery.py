"""Attention-worker discovery through the placement service (PlacementAdmin.ListWorkers, with a
deadline): ALIVE workers of role ATTENTION, and how many ALIVE expert workers there are."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from epserve.grpc_security import PLAINTEXT, Security, open_channel
from epserve.grpc_server import GRPC_OPTIONS
from epserve.protos import placement_pb2, placement_pb2_grpc


class DiscoveryError(Exception):
    pass


@dataclass(frozen=True)
class DiscoveredWorkers:
    attention: tuple[str, ...]        # host:port of each ALIVE attention worker
    num_expert_workers: int           # ALIVE expert workers


def workers_from_proto(response: placement_pb2.ListWorkersResponse) -> DiscoveredWorkers:
    alive = [w for w in response.workers if w.state == placement_pb2.WORKER_STATE_ALIVE]
    attention = tuple(sorted({w.address for w in alive
                              if w.role == placement_pb2.WORKER_ROLE_ATTENTION and w.address}))
    num_expert = sum(1 for w in alive if w.role == placement_pb2.WORKER_ROLE_EXPERT)
    return DiscoveredWorkers(attention, num_expert)


class PlacementDiscovery:
    def __init__(self, address: str, rpc_timeout_s: float, security: Security = PLAINTEXT) -> None:
        self.address = address
        self._rpc_timeout_s = rpc_timeout_s
        self._channel = open_channel(address, security, GRPC_OPTIONS)
        self._stub = placement_pb2_grpc.PlacementAdminStub(self._channel)

    def list_workers(self) -> DiscoveredWorkers:
        try:
            response = self._stub.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=self._rpc_timeout_s)
        except grpc.RpcError as exc:
            raise DiscoveryError(f"placement {self.address}: ListWorkers failed: "
                                 f"{exc.code().name}: {exc.details()}") from exc
        return workers_from_proto(response)

    def close(self) -> None:
        self._channel.close()
