"""Placement for a colocated deployment (``--moe-a2a-backend local``, ``--ep-size 0``): attention
workers only, no expert map; ready once they registered; map RPCs answer FAILED_PRECONDITION."""

from __future__ import annotations

import grpc
import pytest

from epserve.placement_service.__main__ import main
from epserve.placement_service.config import PlacementConfig
from epserve.protos import placement_pb2

pytestmark = pytest.mark.timeout(30)

ATTENTION = placement_pb2.WORKER_ROLE_ATTENTION
EXPERT = placement_pb2.WORKER_ROLE_EXPERT
COLOCATED = "colocated deployment"


@pytest.mark.parametrize("fields,message", [
    (dict(ep_size=1), "--ep-size 1: with --moe-a2a-backend local .* set --ep-size 0"),
    (dict(ep_size=0, ep_num_redundant_experts=2), "--ep-num-redundant-experts 2: .*set it to 0"),
    (dict(ep_size=0, init_expert_location="snap.json"), "--init-expert-location 'snap.json': .*trivial"),
    (dict(ep_size=0, enable_eplb=True), "--enable-eplb: .*no expert placement to rebalance"),
])
def test_local_needs_ep_size_0_and_no_expert_placement(model_dir, fields, message):
    with pytest.raises(ValueError, match=message):
        PlacementConfig(str(model_dir), moe_a2a_backend="local", **fields)


def test_ep_size_0_is_for_local_only(model_dir):
    with pytest.raises(ValueError, match="--ep-size must be >= 1 .*got 0; --ep-size 0 .*needs --moe-a2a-backend local"):
        PlacementConfig(str(model_dir), moe_a2a_backend="torch", ep_size=0)
    config = PlacementConfig(str(model_dir), moe_a2a_backend="local", dp_size=3, ep_size=0)
    assert config.colocated and config.world_size == 3


def test_main_names_the_flag(model_dir, capsys):
    assert main(["--model-path", str(model_dir), "--moe-a2a-backend", "local"]) == 2      # --ep-size defaults to 1
    assert "set --ep-size 0" in capsys.readouterr().err


def test_ready_once_attention_workers_registered_without_a_map(start_server, connect, fingerprint):
    server = start_server(moe_a2a_backend="local", dp_size=2, ep_size=0)
    stubs = connect(server.address)
    watch = server.controller.subscribe("attn-0")       # a watcher gets nothing, before or after readiness
    response = stubs.register("attn-0", ATTENTION, fingerprint)
    assert (response.rank, response.world_size, response.backend) == (0, 2, "local")
    assert not server.controller.is_ready
    stubs.register("attn-1", ATTENTION, fingerprint)
    assert server.controller.is_ready
    assert watch.get(timeout_s=0.2) is None
    assert server.controller.subscribe("attn-1").get(timeout_s=0.1) is None
    assert {w: info.role for w, info in stubs.workers().items()} == {"attn-0": ATTENTION, "attn-1": ATTENTION}
    stubs.placement.Heartbeat(placement_pb2.HeartbeatRequest(worker_id="attn-0"), timeout=5)

    with pytest.raises(grpc.RpcError) as refused:
        stubs.register("expert-0", EXPERT, fingerprint)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert COLOCATED in refused.value.details() and "no expert workers" in refused.value.details()
    with pytest.raises(grpc.RpcError) as load:
        stubs.placement.ReportLoad(placement_pb2.ReportLoadRequest(
            worker_id="attn-0", map_version=0, num_layers=3, num_physical_slots=8, slot_token_counts=[1] * 24,
            num_passes=1), timeout=5)
    assert load.value.code() == grpc.StatusCode.FAILED_PRECONDITION and COLOCATED in load.value.details()


def test_map_and_eplb_admin_rpcs_fail_with_a_reason(start_server, connect, fingerprint):
    server = start_server(moe_a2a_backend="local", dp_size=1, ep_size=0)
    stubs = connect(server.address)
    stubs.register("attn-0", ATTENTION, fingerprint)
    admin = stubs.admin
    calls = [(admin.GetPlacement, placement_pb2.GetPlacementRequest()),
             (admin.PlanRebalance, placement_pb2.RebalanceRequest()),
             (admin.Rebalance, placement_pb2.RebalanceRequest()),
             (admin.SetRedundancy, placement_pb2.SetRedundancyRequest(num_redundant_experts=2)),
             (admin.Rollback, placement_pb2.RollbackRequest()),
             (admin.PauseEplb, placement_pb2.PauseEplbRequest()),
             (admin.ResumeEplb, placement_pb2.ResumeEplbRequest()),
             (admin.ExportSnapshot, placement_pb2.ExportSnapshotRequest()),
             (admin.ImportSnapshot, placement_pb2.Snapshot(json="{}")),
             (admin.DrainWorker, placement_pb2.DrainWorkerRequest(worker_id="attn-0"))]
    for method, request in calls:
        with pytest.raises(grpc.RpcError) as error:
            method(request, timeout=5)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (method, error.value.details())
        assert "no expert placement to read or change" in error.value.details()
    assert list(stubs.workers()) == ["attn-0"]      # ListWorkers (the gateway's discovery) still answers


def test_other_backends_keep_their_map(start_server, connect, fingerprint):
    server = start_server(dp_size=1, ep_size=1)
    stubs = connect(server.address)
    stubs.register_all(fingerprint, dp_size=1, ep_size=1)
    assert server.controller.is_ready
    assert stubs.admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5).map.version == 1
