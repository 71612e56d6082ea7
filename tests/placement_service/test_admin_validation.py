"""Admin requests are bounded before any work (issue 15): redundancy at most E × (W - 1), snapshots of
the deployment's shape, JSON depth and size limits, no message that grows with its input, and never
UNKNOWN — over real gRPC, the map untouched by every refusal."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from epserve.protos import placement_pb2
from test_rebalance_fakes import FakeCluster

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def admin(start_server, connect):
    """2 attention, 2 expert fake workers; conftest's model: L = 3 MoE layers, E = 8."""
    server = start_server()
    cluster = FakeCluster(server.controller, dp_size=2, ep_size=2).start(heartbeat_s=0.05)
    deadline = time.monotonic() + 5
    while not all(a.version == 1 for a in cluster.attention):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield connect(server.address).admin
    cluster.stop()


def refused(method, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=30)
    return info.value


def version(admin) -> int:
    return admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5).map.version


def test_redundancy_has_an_upper_bound(admin):
    for value, words in ((2147483646, "more than 8 = 8 experts × (2 expert workers - 1)"),
                         (1000, "two replicas on one worker"), (10, "more than 8")):
        error = refused(admin.SetRedundancy, placement_pb2.SetRedundancyRequest(num_redundant_experts=value))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details()
    assert version(admin) == 1
    assert admin.SetRedundancy(placement_pb2.SetRedundancyRequest(num_redundant_experts=8), timeout=30).version == 2


def test_snapshot_must_have_the_deployment_shape(admin):
    other_slots = {"num_logical_experts": 8, "physical_to_logical_map": [[e % 8 for e in range(10)]] * 3}
    error = refused(admin.ImportSnapshot, placement_pb2.Snapshot(json=json.dumps(other_slots)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "SetRedundancy" in error.details()
    assert version(admin) == 1


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, "{\"a\": " * 5000 + "1" + "}" * 5000,
                                  "[" * 200_000], ids=["deep-list", "deep-object", "unbalanced"])
def test_deep_json_is_invalid_argument_not_unknown(admin, text):
    error = refused(admin.ImportSnapshot, placement_pb2.Snapshot(json=text))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "nests deeper" in error.details()


def test_messages_never_echo_unbounded_input(admin):
    long_id = "w" * 10_000
    error = refused(admin.DrainWorker, placement_pb2.DrainWorkerRequest(worker_id=long_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 200
    error = refused(admin.PlanRebalance, placement_pb2.RebalanceRequest(algorithm="a" * 100_000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 500
    error = refused(admin.PlanRebalance, placement_pb2.RebalanceRequest(layers=list(range(3, 100_003))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 500
