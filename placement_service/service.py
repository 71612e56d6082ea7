"""gRPC servicers for Placement and PlacementAdmin: proto ↔ plain values at the edge only.

Each RPC converts its request, calls ``PlacementController`` (worker RPCs) or ``AdminOps``
(admin RPCs), converts the answer; a ``PlacementError`` becomes its status code
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ABORTED, RESOURCE_EXHAUSTED,
UNAVAILABLE) with the message. Map-changing admin RPCs (Rebalance, SetRedundancy,
Rollback, ImportSnapshot, DrainWorker) answer once the change is committed (or rolled
back); they hold their gRPC thread meanwhile, never a worker's. DumpExpertDistribution fans
out to the attention workers and answers with one result per worker: a worker's failure is
a result, not the call's status.

WatchPlacement runs on one gRPC thread per stream, blocked on its own subscription queue
(``broadcast.Subscription``); it ends when the client cancels (the cancel callback closes
the queue) or the service shuts down (``controller.close`` closes every queue).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

import grpc

from epserve.expert_map import ExpertMap
from epserve.expert_map_codec import expert_map_to_proto
from epserve.placement_types import data_plane_to_proto, worker_info_to_proto
from epserve.telemetry import Tracing, setup_tracing
from epserve.placement_service.admin import AdminOps
from epserve.placement_service.broadcast import SubscriptionClosed
from epserve.placement_service.controller import PlacementController
from epserve.placement_service.eplb_loop import EplbLoop
from epserve.grpc_server import abort_with
from epserve.placement_service.errors import FailedPrecondition, PlacementError
from epserve.placement_service.failover import Failover
from epserve.placement_service.planner import RebalancePlan
from epserve.placement_service.rebalancer import ChangeResult
from epserve.placement_service.state import PlacementUpdate
from epserve.protos import placement_pb2, placement_pb2_grpc

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
            abort_with(context, exc)
    return wrapper


def update_to_proto(update: PlacementUpdate) -> placement_pb2.PlacementUpdate:
    return placement_pb2.PlacementUpdate(phase=int(update.phase), map=expert_map_to_proto(update.expert_map),
                                         data_plane=data_plane_to_proto(update.data_plane))


class PlacementServicer(placement_pb2_grpc.PlacementServicer):
    """``tracing``: each update sent on a watch stream is a ``placement.push`` span (from taking
    it off the queue until gRPC asks for the next message, i.e. the send). ``failover``: elastic
    EP (ReportSuspicion), None without it."""

    def __init__(self, controller: PlacementController, tracing: Tracing | None = None,
                 failover: Failover | None = None) -> None:
        self.controller, self.failover = controller, failover
        self.tracing = tracing if tracing is not None else setup_tracing("epserve-placement", None)

    @_status_errors
    def Register(self, request: placement_pb2.RegisterRequest, context) -> placement_pb2.RegisterResponse:
        rank = self.controller.register(request.worker_id, request.role, request.address, request.capacity,
                                        request.device, request.model_fingerprint, request.previous_rank)
        config = self.controller.config
        return placement_pb2.RegisterResponse(rank=rank, world_size=self.controller.world_size,
                                              dist_init_addr=self.controller.dist_init_addr,
                                              heartbeat_interval_ms=config.heartbeat_interval_ms,
                                              backend=config.moe_a2a_backend,
                                              elastic_ep_backend=config.elastic_ep_backend)

    @_status_errors
    def Heartbeat(self, request: placement_pb2.HeartbeatRequest, context) -> placement_pb2.HeartbeatResponse:
        self.controller.heartbeat(request.worker_id)
        return placement_pb2.HeartbeatResponse()

    def WatchPlacement(self, request: placement_pb2.WatchPlacementRequest,
                       context: grpc.ServicerContext) -> Iterator[placement_pb2.PlacementUpdate]:
        name = request.worker_id or context.peer()
        try:
            subscription = self.controller.subscribe(name)
        except PlacementError as exc:
            abort_with(context, exc)
        context.add_callback(subscription.close)
        try:
            while True:
                update = subscription.get(timeout_s=WATCH_LIVENESS_CHECK_S)
                if update is None:
                    if not context.is_active():
                        return
                    continue
                span = self.tracing.tracer.start_span("placement.push", attributes={   # not current across yield
                    "epserve.worker_id": name, "epserve.phase": update.phase.name,
                    "epserve.map_version": update.expert_map.version})
                try:
                    yield update_to_proto(update)
                finally:
                    span.end()
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

    @_status_errors
    def ReportSuspicion(self, request: placement_pb2.ReportSuspicionRequest,
                        context) -> placement_pb2.ReportSuspicionResponse:
        """Elastic EP: probe the suspect now (FAILED_PRECONDITION without --elastic-ep-backend)."""
        if self.failover is None:
            raise FailedPrecondition("suspicions are for elastic EP; this placement runs --elastic-ep-backend none")
        suspect = self.failover.report_suspicion(request.worker_id, request.suspect_rank, request.reason)
        return placement_pb2.ReportSuspicionResponse(state=int(suspect.state),
                                                     current_version=self.controller.current_version)


def plan_to_proto(plan: RebalancePlan, expert_map: ExpertMap) -> placement_pb2.PlanRebalanceResponse:
    return placement_pb2.PlanRebalanceResponse(
        map=expert_map_to_proto(expert_map), balancedness_before=plan.balancedness_before,
        balancedness_after=plan.balancedness_after, experts_moved=plan.experts_moved, bytes_moved=plan.bytes_moved,
        plan_ms=plan.plan_ms, algorithm=plan.algorithm, changed_layers=list(plan.changed_layers))


def change_to_proto(result: ChangeResult) -> placement_pb2.RebalanceResponse:
    response = placement_pb2.RebalanceResponse(version=result.version, previous_version=result.previous_version,
                                               num_versions=result.num_versions, duration_ms=result.duration_ms,
                                               message=result.message)
    if result.plan is not None:
        plan = result.plan
        response.balancedness_before, response.balancedness_after = plan.balancedness_before, plan.balancedness_after
        response.experts_moved, response.bytes_moved, response.plan_ms = (plan.experts_moved, plan.bytes_moved,
                                                                          plan.plan_ms)
    return response


class PlacementAdminServicer(placement_pb2_grpc.PlacementAdminServicer):
    def __init__(self, controller: PlacementController, admin: AdminOps, eplb: EplbLoop) -> None:
        self.controller, self.admin, self.eplb = controller, admin, eplb

    @_status_errors
    def GetPlacement(self, request: placement_pb2.GetPlacementRequest, context) -> placement_pb2.GetPlacementResponse:
        expert_map, balancedness, versions = self.controller.get_placement(request.version)
        status = self.admin.status(expert_map)
        return placement_pb2.GetPlacementResponse(
            map=expert_map_to_proto(expert_map), balancedness=balancedness, eplb_enabled=self.eplb.enabled,
            eplb_paused=self.eplb.paused, versions=versions, window_balancedness=status.window_balancedness,
            window_num_passes=status.window_num_passes, eplb_algorithm=self.controller.config.eplb_algorithm,
            rebalance_in_progress=status.rebalance_in_progress, num_rebalances=status.num_rebalances,
            num_rollbacks=status.num_rollbacks, last_rebalance_ms=status.last_rebalance_ms,
            last_operation=status.last_operation)

    @_status_errors
    def ListWorkers(self, request: placement_pb2.ListWorkersRequest, context) -> placement_pb2.ListWorkersResponse:
        return placement_pb2.ListWorkersResponse(
            workers=[worker_info_to_proto(info) for info in self.controller.list_workers()])

    @_status_errors
    def PlanRebalance(self, request: placement_pb2.RebalanceRequest, context) -> placement_pb2.PlanRebalanceResponse:
        plan = self.admin.plan(request.algorithm, list(request.layers))
        current = self.controller.current_map()
        planned = ExpertMap(plan.phy2log, current.num_logical_experts, 0, current.slot_owners)
        return plan_to_proto(plan, planned)

    @_status_errors
    def Rebalance(self, request: placement_pb2.RebalanceRequest, context) -> placement_pb2.RebalanceResponse:
        return change_to_proto(self.admin.rebalance(request.algorithm, list(request.layers)))

    @_status_errors
    def SetRedundancy(self, request: placement_pb2.SetRedundancyRequest, context) -> placement_pb2.RebalanceResponse:
        return change_to_proto(self.admin.set_redundancy(request.num_redundant_experts))

    @_status_errors
    def Rollback(self, request: placement_pb2.RollbackRequest, context) -> placement_pb2.RebalanceResponse:
        return change_to_proto(self.admin.rollback())

    @_status_errors
    def PauseEplb(self, request: placement_pb2.PauseEplbRequest, context) -> placement_pb2.EplbStateResponse:
        self.eplb.pause()
        return placement_pb2.EplbStateResponse(enabled=self.eplb.enabled, paused=self.eplb.paused)

    @_status_errors
    def ResumeEplb(self, request: placement_pb2.ResumeEplbRequest, context) -> placement_pb2.EplbStateResponse:
        self.eplb.resume()
        return placement_pb2.EplbStateResponse(enabled=self.eplb.enabled, paused=self.eplb.paused)

    @_status_errors
    def ExportSnapshot(self, request: placement_pb2.ExportSnapshotRequest, context) -> placement_pb2.Snapshot:
        return placement_pb2.Snapshot(json=self.admin.export_snapshot())

    @_status_errors
    def ImportSnapshot(self, request: placement_pb2.Snapshot, context) -> placement_pb2.RebalanceResponse:
        return change_to_proto(self.admin.import_snapshot(request.json))

    @_status_errors
    def DrainWorker(self, request: placement_pb2.DrainWorkerRequest, context) -> placement_pb2.RebalanceResponse:
        return change_to_proto(self.admin.drain(request.worker_id))

    @_status_errors
    def DumpExpertDistribution(self, request: placement_pb2.AdminDumpExpertDistributionRequest, context
                               ) -> placement_pb2.AdminDumpExpertDistributionResponse:
        dumps = self.admin.dump_expert_distribution(request.directory, request.worker_timeout_s)
        return placement_pb2.AdminDumpExpertDistributionResponse(workers=[
            placement_pb2.AttentionWorkerDump(
                worker_id=d.worker_id, address=d.address, status_code=d.status_code, message=d.message, path=d.path,
                mode=d.mode, num_passes=d.num_passes, num_token_records=d.num_token_records) for d in dumps])
