"""gRPC servicers for Placement and PlacementAdmin: proto ↔ plain values at the edge only.

Each RPC converts its request, calls ``PlacementController``, converts the answer; a
``PlacementError`` becomes its status code (INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAVAILABLE) with the controller's message.

WatchPlacement runs on one gRPC thread per stream, blocked on its own subscription queue
(``broadcast.Subscription``); it ends when the client cancels (the cancel callback closes
the queue) or the service shuts down (``controller.close`` closes every queue).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

import grpc

from epserve.expert_map_codec import expert_map_to_proto
from epserve.placement_client import data_plane_to_proto, worker_info_to_proto
from placement_service.broadcast import SubscriptionClosed
from placement_service.controller import PlacementController
from placement_service.errors import PlacementError
from placement_service.state import PlacementUpdate
from protos import placement_pb2, placement_pb2_grpc

logger = logging.getLogger(__name__)

# A blocked watch stream wakes this often to check that its client is still there (the cancel
# callback normally wakes it at once); not a busy loop.
WATCH_LIVENESS_CHECK_S = 30.0


def _status_errors(method: Callable) -> Callable:
    """Turn a PlacementError raised by a unary RPC into its gRPC status."""
    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except PlacementError as exc:
            context.abort(grpc.StatusCode[exc.code], str(exc))
    return wrapper


def update_to_proto(update: PlacementUpdate) -> placement_pb2.PlacementUpdate:
    return placement_pb2.PlacementUpdate(phase=int(update.phase), map=expert_map_to_proto(update.expert_map),
                                         data_plane=data_plane_to_proto(update.data_plane),
                                         layers=list(update.layers))


class PlacementServicer(placement_pb2_grpc.PlacementServicer):
    def __init__(self, controller: PlacementController) -> None:
        self.controller = controller

    @_status_errors
    def Register(self, request: placement_pb2.RegisterRequest, context) -> placement_pb2.RegisterResponse:
        rank = self.controller.register(request.worker_id, request.role, request.address, request.capacity,
                                        request.device, request.model_fingerprint, request.previous_rank)
        config = self.controller.config
        return placement_pb2.RegisterResponse(rank=rank, world_size=config.world_size,
                                              dist_init_addr=self.controller.dist_init_addr,
                                              heartbeat_interval_ms=config.heartbeat_interval_ms,
                                              backend=config.moe_a2a_backend)

    @_status_errors
    def Heartbeat(self, request: placement_pb2.HeartbeatRequest, context) -> placement_pb2.HeartbeatResponse:
        return placement_pb2.HeartbeatResponse(
            latest_version=self.controller.heartbeat(request.worker_id, request.map_version))

    def WatchPlacement(self, request: placement_pb2.WatchPlacementRequest,
                       context: grpc.ServicerContext) -> Iterator[placement_pb2.PlacementUpdate]:
        name = request.worker_id or context.peer()
        try:
            subscription = self.controller.subscribe(name)
        except PlacementError as exc:
            context.abort(grpc.StatusCode[exc.code], str(exc))
        context.add_callback(subscription.close)
        try:
            while True:
                update = subscription.get(timeout_s=WATCH_LIVENESS_CHECK_S)
                if update is None:
                    if not context.is_active():
                        return
                    continue
                yield update_to_proto(update)
        except SubscriptionClosed:
            return
        finally:
            self.controller.unsubscribe(subscription)

    @_status_errors
    def AckPlacement(self, request: placement_pb2.AckPlacementRequest, context) -> placement_pb2.AckPlacementResponse:
        self.controller.ack(request.worker_id, request.version, request.phase, request.ok, request.error)
        return placement_pb2.AckPlacementResponse()

    @_status_errors
    def ReportLoad(self, request: placement_pb2.ReportLoadRequest, context) -> placement_pb2.ReportLoadResponse:
        self.controller.report_load(request.worker_id, request.map_version, request.num_layers,
                                    request.num_physical_slots, list(request.slot_token_counts), request.num_passes)
        return placement_pb2.ReportLoadResponse()


def _not_yet(rpc: str) -> Callable:
    def method(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"not yet supported: {rpc}")
    method.__name__ = rpc
    return method


class PlacementAdminServicer(placement_pb2_grpc.PlacementAdminServicer):
    def __init__(self, controller: PlacementController) -> None:
        self.controller = controller

    @_status_errors
    def GetPlacement(self, request: placement_pb2.GetPlacementRequest, context) -> placement_pb2.GetPlacementResponse:
        expert_map, balancedness, versions = self.controller.get_placement(request.version)
        return placement_pb2.GetPlacementResponse(map=expert_map_to_proto(expert_map), balancedness=balancedness,
                                                  eplb_enabled=False, eplb_paused=False, versions=versions)

    @_status_errors
    def ListWorkers(self, request: placement_pb2.ListWorkersRequest, context) -> placement_pb2.ListWorkersResponse:
        return placement_pb2.ListWorkersResponse(
            workers=[worker_info_to_proto(info) for info in self.controller.list_workers()])

    # Rebalancing, redundancy changes, snapshots and draining come with live rebalancing.
    PlanRebalance = _not_yet("PlanRebalance")
    Rebalance = _not_yet("Rebalance")
    SetRedundancy = _not_yet("SetRedundancy")
    Rollback = _not_yet("Rollback")
    PauseEplb = _not_yet("PauseEplb")
    ResumeEplb = _not_yet("ResumeEplb")
    ExportSnapshot = _not_yet("ExportSnapshot")
    ImportSnapshot = _not_yet("ImportSnapshot")
    DrainWorker = _not_yet("DrainWorker")
