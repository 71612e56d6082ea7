"""PlacementAdmin over real gRPC (in-process server, fake workers acking on the controller):
every operation, and every bad request answered with its status while the map stays as it was."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch

from epserve.expert_map_codec import expert_map_from_proto
from epserve.protos import placement_pb2
from test_rebalance_fakes import FakeCluster, report_load, skewed_counts

pytestmark = pytest.mark.timeout(90)

# conftest's model: MoE layers (0, 2, 3) → L = 3, E = 8, hidden 32, moe_intermediate 16.
EXPERT_BYTES = 3 * 32 * 16 * 2


def rpc_error(method, request, timeout: float = 30) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=timeout)
    return info.value


@pytest.fixture
def deployed(start_server, connect):
    """start(**config) → (server, admin stub, fake cluster) with every fake worker attached."""
    clusters = []

    def start(**overrides):
        server = start_server(**overrides)
        cluster = FakeCluster(server.controller, dp_size=overrides.get("dp_size", 2),
                              ep_size=overrides.get("ep_size", 2)).start(heartbeat_s=0.05)
        clusters.append(cluster)
        deadline = time.monotonic() + 5
        while not all(a.version == 1 for a in cluster.attention):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return server, connect(server.address).admin, cluster

    yield start
    for cluster in clusters:
        cluster.stop()


def current(admin) -> placement_pb2.GetPlacementResponse:
    return admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5)


def test_bad_requests_get_their_status_and_leave_the_map_untouched(deployed):
    server, admin, cluster = deployed()
    before = current(admin).map
    error = rpc_error(admin.PlanRebalance, placement_pb2.RebalanceRequest())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "no expert load" in error.details()
    assert rpc_error(admin.Rebalance, placement_pb2.RebalanceRequest()).code() == grpc.StatusCode.FAILED_PRECONDITION
    report_load(server.controller, skewed_counts(server.controller))

    cases = [
        (admin.PlanRebalance, placement_pb2.RebalanceRequest(algorithm="bogus"), "INVALID_ARGUMENT", "unknown"),
        (admin.Rebalance, placement_pb2.RebalanceRequest(layers=[3]), "INVALID_ARGUMENT", "out of range"),
        (admin.Rebalance, placement_pb2.RebalanceRequest(layers=[1, 1]), "INVALID_ARGUMENT", "duplicates"),
        (admin.Rebalance, placement_pb2.RebalanceRequest(algorithm="deepseek_hierarchical"),
         "FAILED_PRECONDITION", "num_groups"),
        (admin.SetRedundancy, placement_pb2.SetRedundancyRequest(num_redundant_experts=-1), "INVALID_ARGUMENT", ">= 0"),
        (admin.SetRedundancy, placement_pb2.SetRedundancyRequest(num_redundant_experts=1), "INVALID_ARGUMENT",
         "9 slots do not split evenly over 2 expert workers"),
        (admin.DrainWorker, placement_pb2.DrainWorkerRequest(worker_id="nobody"), "NOT_FOUND", "nobody"),
        (admin.DrainWorker, placement_pb2.DrainWorkerRequest(worker_id="attn-0"), "INVALID_ARGUMENT", "attention"),
        (admin.DrainWorker, placement_pb2.DrainWorkerRequest(worker_id="expert-0"), "FAILED_PRECONDITION",
         "fewer than the 8 logical experts"),
        (admin.Rollback, placement_pb2.RollbackRequest(), "FAILED_PRECONDITION", "initial map"),
        (admin.GetPlacement, placement_pb2.GetPlacementRequest(version=9), "NOT_FOUND", "versions: [1]"),
        (admin.ImportSnapshot, placement_pb2.Snapshot(json="{not json"), "INVALID_ARGUMENT", "not valid JSON"),
        (admin.ImportSnapshot, placement_pb2.Snapshot(json=json.dumps(
            {"num_logical_experts": 16, "physical_to_logical_map": [list(range(16))] * 3})),
         "FAILED_PRECONDITION", "another model"),
        (admin.ImportSnapshot, placement_pb2.Snapshot(json=json.dumps(
            {"model_name": "qwen3_moe:0123456789abcdef", "physical_to_logical_map": [list(range(8))] * 3})),
         "FAILED_PRECONDITION", "model_name"),
        (admin.ImportSnapshot, placement_pb2.Snapshot(json=json.dumps(
            {"physical_to_logical_map": [[0, 0, 1, 2, 3, 4, 5, 6]] * 3})), "INVALID_ARGUMENT",
         "logical expert 7 of layer 0 without a replica"),
        (admin.ImportSnapshot, placement_pb2.Snapshot(json=json.dumps(
            {"physical_to_logical_map": [list(range(8))] * 2})), "INVALID_ARGUMENT", "2 layers"),
        (admin.ImportSnapshot, placement_pb2.Snapshot(json=json.dumps(
            {"physical_to_logical_map": [list(range(8)) + [0]] * 3})), "INVALID_ARGUMENT", "9 slots"),
        (admin.ImportSnapshot, placement_pb2.Snapshot(json=json.dumps({"logical_count": [[1, -1] * 4] * 3})),
         "INVALID_ARGUMENT", ">= 0"),
    ]
    for method, request, code, text in cases:
        error = rpc_error(method, request)
        assert (error.code().name, text in error.details()) == (code, True), (request, error.details())
    after = current(admin)
    assert after.map == before and list(after.versions) == [1] and after.num_rebalances == 0
    assert cluster.violations == []


def test_plan_rebalance_rollback(deployed):
    server, admin, cluster = deployed()
    v1 = current(admin).map
    report_load(server.controller, skewed_counts(server.controller))
    plan = admin.PlanRebalance(placement_pb2.RebalanceRequest(), timeout=30)
    assert plan.balancedness_after > plan.balancedness_before and plan.experts_moved > 0
    assert plan.bytes_moved == plan.experts_moved * EXPERT_BYTES and plan.algorithm == "deepseek"
    assert list(plan.changed_layers) == [0, 1, 2] and plan.plan_ms > 0

    result = admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=30)
    assert (result.previous_version, result.version, result.num_versions) == (1, 2, 1)
    assert (result.experts_moved, result.bytes_moved) == (plan.experts_moved, plan.bytes_moved)
    assert result.duration_ms > 0
    status = current(admin)
    assert status.map.phy2log == plan.map.phy2log and status.last_operation == "rebalance"
    assert status.window_balancedness == pytest.approx(plan.balancedness_after)
    again = admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=30)  # already balanced for this load
    assert again.num_versions == 0 and again.version == 2 and "no change" in again.message

    back = admin.Rollback(placement_pb2.RollbackRequest(), timeout=30)
    assert (back.previous_version, back.version) == (2, 3)
    status = current(admin)
    assert status.map.phy2log == v1.phy2log and status.map.version == 3 and status.last_operation == "rollback"
    assert (status.num_rebalances, status.num_rollbacks, list(status.versions)) == (2, 0, [1, 2, 3])
    assert status.last_rebalance_ms > 0 and not status.rebalance_in_progress
    assert cluster.violations == []


def test_set_redundancy_and_drain(deployed):
    server, admin, cluster = deployed(dp_size=1, ep_size=4, ep_num_redundant_experts=4)
    result = admin.SetRedundancy(placement_pb2.SetRedundancyRequest(num_redundant_experts=8), timeout=30)
    assert result.version == 2
    expert_map = expert_map_from_proto(current(admin).map)
    assert expert_map.num_physical_slots == 16 and expert_map.num_workers == 4
    same = admin.SetRedundancy(placement_pb2.SetRedundancyRequest(num_redundant_experts=8), timeout=30)
    assert same.num_versions == 0 and same.version == 2

    drained = admin.DrainWorker(placement_pb2.DrainWorkerRequest(worker_id="expert-2"), timeout=30)
    assert drained.version == 3
    expert_map = expert_map_from_proto(current(admin).map)
    assert bool((expert_map.phy2log[:, expert_map.slots_of_worker("expert-2")] == -1).all())
    assert bool((expert_map.logcnt >= 1).all())  # every expert still served
    workers = {w.worker_id: w for w in admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=5).workers}
    assert workers["expert-2"].state == placement_pb2.WORKER_STATE_DRAINING
    assert workers["expert-1"].state == placement_pb2.WORKER_STATE_ALIVE
    error = rpc_error(admin.DrainWorker, placement_pb2.DrainWorkerRequest(worker_id="expert-2"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "already drained" in error.details()
    # Rebalancing keeps the drained worker empty (auto → elasticity_aware).
    report_load(server.controller, torch.randint(0, 100, (3, 16)))
    admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=30)
    expert_map = expert_map_from_proto(current(admin).map)
    assert bool((expert_map.phy2log[:, expert_map.slots_of_worker("expert-2")] == -1).all())
    # Rolling back the rebalance, then the drain, gives expert-2 its slots back: no longer drained.
    admin.Rollback(placement_pb2.RollbackRequest(), timeout=30)
    admin.Rollback(placement_pb2.RollbackRequest(), timeout=30)
    restored = expert_map_from_proto(current(admin).map)
    assert torch.equal(restored.phy2log, server.controller.get_placement(2)[0].phy2log)
    workers = {w.worker_id: w for w in admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=5).workers}
    assert workers["expert-2"].state == placement_pb2.WORKER_STATE_ALIVE
    assert cluster.violations == []


def test_export_import_snapshots_and_eplb_pause(deployed):
    server, admin, cluster = deployed()
    report_load(server.controller, skewed_counts(server.controller))
    exported = json.loads(admin.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=5).json)
    assert exported["physical_to_logical_map"] == [list(range(8))] * 3
    assert exported["num_layers"] == 3 and exported["num_logical_experts"] == 8
    assert exported["model_name"] == f"qwen3_moe:{server.config.model.fingerprint}"
    assert sum(map(sum, exported["logical_count"])) > 0

    admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=30)
    back = admin.ImportSnapshot(placement_pb2.Snapshot(json=json.dumps(exported)), timeout=30)
    assert back.version == 3 and current(admin).map.phy2log == [e for row in exported["physical_to_logical_map"]
                                                                 for e in row]
    counts_only = {"logical_count": [[1000, 1000] + [1] * 6] * 3}  # SGLang-style: no identity fields
    planned = admin.ImportSnapshot(placement_pb2.Snapshot(json=json.dumps(counts_only)), timeout=30)
    assert planned.version == 4 and planned.balancedness_after > planned.balancedness_before

    state = admin.PauseEplb(placement_pb2.PauseEplbRequest(), timeout=5)
    assert (state.enabled, state.paused) == (False, True) and current(admin).eplb_paused
    state = admin.ResumeEplb(placement_pb2.ResumeEplbRequest(), timeout=5)
    assert (state.enabled, state.paused) == (False, False)
    assert cluster.violations == []


def test_state_survives_a_restart(start_server, connect, tmp_path, free_port):
    port, db = free_port(), str(tmp_path / "placement.db")
    server = start_server(port=port, state_db=db, enable_eplb=True)
    cluster = FakeCluster(server.controller).start(heartbeat_s=0.05)
    deadline = time.monotonic() + 5
    while not all(a.version == 1 for a in cluster.attention):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    admin = connect(server.address).admin
    report_load(server.controller, skewed_counts(server.controller))
    admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=30)
    admin.PauseEplb(placement_pb2.PauseEplbRequest(), timeout=5)
    before = current(admin)
    cluster.stop()
    server.stop()

    restarted = start_server(port=port, state_db=db, enable_eplb=True)
    after = connect(restarted.address).admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5)
    assert after.map == before.map and list(after.versions) == [1, 2]
    assert after.eplb_paused and after.eplb_enabled
    assert after.num_rebalances == 1 and after.last_operation == "rebalance"
    assert restarted.controller.reserve_version() == 3
