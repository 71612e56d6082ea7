"""The placement service in-process (built by start_placement_server), through the real stubs."""

from __future__ import annotations

import json
import queue
import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.expert_map_codec import expert_map_from_proto
from epserve.placement_client import PlacementClient
from epserve.placement_types import DataPlaneInfo, UpdatePhase, WorkerRole
from epserve.protos import placement_pb2

pytestmark = pytest.mark.timeout(30)

ATTENTION = placement_pb2.WORKER_ROLE_ATTENTION
EXPERT = placement_pb2.WORKER_ROLE_EXPERT


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def test_ranks_by_role_in_arrival_order(start_server, connect, fingerprint):
    server = start_server(dp_size=2, ep_size=3, ep_num_redundant_experts=1)
    stubs = connect(server.address)
    first_expert = stubs.register("expert-a", EXPERT, fingerprint)
    first_attention = stubs.register("attn-a", ATTENTION, fingerprint)
    assert (first_expert.rank, first_attention.rank) == (2, 0)
    assert stubs.register("expert-b", EXPERT, fingerprint).rank == 3
    assert stubs.register("attn-b", ATTENTION, fingerprint).rank == 1
    assert stubs.register("expert-c", EXPERT, fingerprint).rank == 4
    assert first_expert.world_size == 5
    assert first_expert.dist_init_addr == server.dist_init_addr
    assert first_expert.heartbeat_interval_ms == 100
    assert first_expert.backend == "torch"
    # A known worker re-registering keeps its rank.
    assert stubs.register("expert-a", EXPERT, fingerprint).rank == 2
    workers = stubs.workers()
    assert {w: info.rank for w, info in workers.items()} == {
        "attn-a": 0, "attn-b": 1, "expert-a": 2, "expert-b": 3, "expert-c": 4}
    assert all(info.state == placement_pb2.WORKER_STATE_ALIVE for info in workers.values())


def test_previous_rank_is_honoured_after_placement_forgot(start_server, connect, fingerprint):
    server = start_server(dp_size=2, ep_size=2)
    stubs = connect(server.address)
    assert stubs.register("attn-x", ATTENTION, fingerprint, previous_rank=1).rank == 1
    assert stubs.register("attn-y", ATTENTION, fingerprint).rank == 0
    error = rpc_error(stubs.register, "expert-x", EXPERT, fingerprint, previous_rank=0)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "previous_rank" in error.details()


def test_too_many_workers_is_resource_exhausted(start_server, connect, fingerprint):
    server = start_server(dp_size=1, ep_size=2)
    stubs = connect(server.address)
    stubs.register("attn-0", ATTENTION, fingerprint)
    error = rpc_error(stubs.register, "attn-1", ATTENTION, fingerprint)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--dp-size 1" in error.details()


def test_wrong_model_fingerprint_is_failed_precondition(start_server, connect):
    stubs = connect(start_server().address)
    error = rpc_error(stubs.register, "expert-0", EXPERT, "0123456789abcdef")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model_fingerprint" in error.details()


def test_bad_fields_are_invalid_argument(start_server, connect, fingerprint):
    stubs = connect(start_server().address)
    error = rpc_error(stubs.register, "", EXPERT, fingerprint)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "worker_id" in error.details()
    error = rpc_error(stubs.register, "w", placement_pb2.WORKER_ROLE_UNSPECIFIED, fingerprint)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in error.details()


def read_updates(call, into: queue.Queue) -> threading.Thread:
    def run():
        try:
            for update in call:
                into.put(update)
        except grpc.RpcError as exc:
            into.put(exc)
        into.put(None)  # stream ended
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_watch_gets_map_once_all_registered_then_new_versions(start_server, connect, fingerprint, commit_map):
    server = start_server(dp_size=2, ep_size=2)
    stubs = connect(server.address)
    updates: queue.Queue = queue.Queue()
    read_updates(stubs.placement.WatchPlacement(placement_pb2.WatchPlacementRequest(worker_id="early"),
                                                timeout=20), updates)
    stubs.register("expert-0", EXPERT, fingerprint)
    stubs.register("expert-1", EXPERT, fingerprint)
    stubs.register("attn-0", ATTENTION, fingerprint)
    with pytest.raises(queue.Empty):  # an expert map exists, but the world is not complete yet
        updates.get(timeout=0.3)
    stubs.register("attn-1", ATTENTION, fingerprint)

    first = updates.get(timeout=5)
    assert first.phase == placement_pb2.UPDATE_PHASE_COMMIT
    expert_map = expert_map_from_proto(first.map)
    assert expert_map.version == 1
    assert expert_map.slot_owners == ("expert-0", "expert-1")
    assert (expert_map.num_layers, expert_map.num_logical_experts) == (3, 8)  # layer 1 is dense
    assert first.data_plane.world_size == 4 and first.data_plane.backend == "torch"
    assert first.data_plane.dist_init_addr == server.dist_init_addr
    assert [(w.worker_id, w.rank) for w in first.data_plane.workers] == [
        ("attn-0", 0), ("attn-1", 1), ("expert-0", 2), ("expert-1", 3)]

    new_phy2log = expert_map.phy2log.flip(1)
    commit_map(server.controller, new_phy2log)
    second = updates.get(timeout=5)
    assert second.map.version == 2
    assert torch.equal(expert_map_from_proto(second.map).phy2log, new_phy2log)

    # A late subscriber gets the current version at once.
    late: queue.Queue = queue.Queue()
    read_updates(stubs.placement.WatchPlacement(placement_pb2.WatchPlacementRequest(worker_id="late"),
                                                timeout=20), late)
    assert late.get(timeout=5).map.version == 2

    server.stop()  # streams end cleanly on shutdown
    assert updates.get(timeout=5) is None
    assert late.get(timeout=5) is None


def test_get_placement_current_past_unknown_and_balancedness(start_server, connect, fingerprint, commit_map):
    server = start_server(dp_size=1, ep_size=2)
    stubs = connect(server.address)
    error = rpc_error(stubs.admin.GetPlacement, placement_pb2.GetPlacementRequest(version=0), timeout=5)
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # no map before the expert workers register
    stubs.register_all(fingerprint, dp_size=1, ep_size=2)
    current = stubs.admin.GetPlacement(placement_pb2.GetPlacementRequest(version=0), timeout=5)
    assert current.map.version == 1 and list(current.versions) == [1]
    assert current.balancedness == 1.0  # no load recorded yet

    # Worker expert-0 owns slots 0..3, expert-1 slots 4..7: load 3:1 in every layer → mean/max = 2/3.
    counts = torch.zeros(3, 8, dtype=torch.int64)
    counts[:, 0] = 30
    counts[:, 5] = 10
    stubs.placement.ReportLoad(placement_pb2.ReportLoadRequest(
        worker_id="attn-0", map_version=1, num_layers=3, num_physical_slots=8,
        slot_token_counts=counts.flatten().tolist(), num_passes=4), timeout=5)
    assert stubs.admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5).balancedness == pytest.approx(2 / 3)

    commit_map(server.controller, torch.arange(8).roll(1).repeat(3, 1))
    response = stubs.admin.GetPlacement(placement_pb2.GetPlacementRequest(version=0), timeout=5)
    assert response.map.version == 2 and list(response.versions) == [1, 2]
    assert response.balancedness == 1.0  # nothing reported under version 2
    past = stubs.admin.GetPlacement(placement_pb2.GetPlacementRequest(version=1), timeout=5)
    assert past.map.version == 1 and past.map.phy2log == current.map.phy2log
    error = rpc_error(stubs.admin.GetPlacement, placement_pb2.GetPlacementRequest(version=7), timeout=5)
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_report_load_with_wrong_shape_names_the_field(start_server, connect, fingerprint):
    server = start_server(dp_size=1, ep_size=2)
    stubs = connect(server.address)
    stubs.register_all(fingerprint, dp_size=1, ep_size=2)
    request = placement_pb2.ReportLoadRequest(worker_id="attn-0", map_version=1, num_layers=3,
                                              num_physical_slots=8, slot_token_counts=[1] * 23, num_passes=1)
    error = rpc_error(stubs.placement.ReportLoad, request, timeout=5)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "slot_token_counts" in error.details()
    request.slot_token_counts[:] = [1] * 24
    request.num_physical_slots = 12
    error = rpc_error(stubs.placement.ReportLoad, request, timeout=5)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_physical_slots" in error.details()
    request.num_physical_slots, request.map_version = 8, 9
    assert rpc_error(stubs.placement.ReportLoad, request, timeout=5).code() == grpc.StatusCode.NOT_FOUND
    request.map_version, request.worker_id = 1, "stranger"
    assert rpc_error(stubs.placement.ReportLoad, request, timeout=5).code() == grpc.StatusCode.NOT_FOUND


def test_ack_is_recorded_and_checked(start_server, connect, fingerprint):
    server = start_server(dp_size=1, ep_size=2)
    stubs = connect(server.address)
    stubs.register_all(fingerprint, dp_size=1, ep_size=2)
    stubs.placement.AckPlacement(placement_pb2.AckPlacementRequest(
        worker_id="expert-1", version=1, phase=placement_pb2.UPDATE_PHASE_COMMIT, ok=True), timeout=5)
    assert stubs.workers()["expert-1"].map_version == 1
    error = rpc_error(stubs.placement.AckPlacement, placement_pb2.AckPlacementRequest(
        worker_id="expert-1", version=5, phase=placement_pb2.UPDATE_PHASE_COMMIT, ok=True), timeout=5)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(stubs.placement.AckPlacement, placement_pb2.AckPlacementRequest(
        worker_id="expert-1", version=1, ok=True), timeout=5)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "phase" in error.details()


def test_silent_worker_becomes_suspect_then_dead(start_server, connect, fingerprint, wait_until):
    server = start_server(dp_size=1, ep_size=1, heartbeat_interval_ms=50, heartbeat_timeout_ms=400)
    stubs = connect(server.address)
    stubs.register("attn-0", ATTENTION, fingerprint)
    stubs.register("expert-0", EXPERT, fingerprint)
    beating = threading.Event()
    beating.set()

    def heartbeat_attention():
        while beating.is_set():
            stubs.placement.Heartbeat(placement_pb2.HeartbeatRequest(worker_id="attn-0"), timeout=5)
            threading.Event().wait(0.03)

    beater = threading.Thread(target=heartbeat_attention, daemon=True)
    beater.start()
    try:
        wait_until(lambda: stubs.workers()["expert-0"].state == placement_pb2.WORKER_STATE_SUSPECT, timeout_s=3)
        wait_until(lambda: stubs.workers()["expert-0"].state == placement_pb2.WORKER_STATE_DEAD, timeout_s=3)
        assert stubs.workers()["attn-0"].state == placement_pb2.WORKER_STATE_ALIVE  # it kept beating
        stubs.placement.Heartbeat(placement_pb2.HeartbeatRequest(worker_id="expert-0"), timeout=5)
        assert stubs.workers()["expert-0"].state == placement_pb2.WORKER_STATE_ALIVE
    finally:
        beating.clear()
        beater.join(timeout=5)
    error = rpc_error(stubs.placement.Heartbeat, placement_pb2.HeartbeatRequest(worker_id="nobody"), timeout=5)
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_health_is_serving_and_admin_changes_wait_for_a_map(start_server, connect):
    server = start_server()
    stubs = connect(server.address)
    health = health_pb2_grpc.HealthStub(stubs.channel)
    for service in ("", "epserve.v1.Placement", "epserve.v1.PlacementAdmin"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    error = rpc_error(stubs.admin.Rebalance, placement_pb2.RebalanceRequest(), timeout=5)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "no expert map yet" in error.details()


def test_restart_with_state_db_resumes_version_ranks_and_clients(start_server, connect, fingerprint, tmp_path,
                                                                  wait_until, free_port, commit_map):
    port = free_port()
    db = str(tmp_path / "placement.db")
    server = start_server(dp_size=1, ep_size=2, port=port, state_db=db)
    clients = [PlacementClient(server.address, worker_id, role, f"127.0.0.1:{4000 + i}",
                               model_fingerprint=fingerprint, timeout_s=2)
               for i, (worker_id, role) in enumerate([("expert-0", WorkerRole.EXPERT), ("attn-0", WorkerRole.ATTENTION),
                                                       ("expert-1", WorkerRole.EXPERT)])]
    seen: queue.Queue = queue.Queue()
    try:
        ranks = {client.worker_id: client.register(deadline_s=5).rank for client in clients}
        assert ranks == {"attn-0": 0, "expert-0": 1, "expert-1": 2}
        clients[1].watch(lambda phase, expert_map, data_plane: seen.put((phase, expert_map, data_plane)))
        phase, expert_map, data_plane = seen.get(timeout=5)
        assert phase == UpdatePhase.COMMIT and expert_map.version == 1
        assert isinstance(data_plane, DataPlaneInfo) and data_plane.world_size == 3
        commit_map(server.controller, expert_map.phy2log.flip(1))
        assert seen.get(timeout=5)[1].version == 2
        dist_init_addr = server.dist_init_addr
        server.stop()

        restarted = start_server(dp_size=1, ep_size=2, port=port, state_db=db)
        assert restarted.dist_init_addr == dist_init_addr  # the rendezvous port is reused
        stubs = connect(restarted.address)
        response = stubs.admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5)
        assert response.map.version == 2 and list(response.versions) == [1, 2]
        # Restored workers are SUSPECT until they are heard from; the clients' heartbeats (or
        # re-registrations, if they saw placement down) bring them back with their old ranks.
        wait_until(lambda: all(w.state == placement_pb2.WORKER_STATE_ALIVE for w in stubs.workers().values()),
                   timeout_s=5)
        assert {w: info.rank for w, info in stubs.workers().items()} == ranks
        assert {client.worker_id: client.registration.rank for client in clients} == ranks
        # The watch re-subscribed; the same version is not delivered twice.
        commit_map(restarted.controller, expert_map.phy2log)
        phase, newest, _ = seen.get(timeout=5)
        assert newest.version == 3 and torch.equal(newest.phy2log, expert_map.phy2log)
    finally:
        for client in clients:
            client.close()


def test_client_ack_and_report_load(start_server, fingerprint, wait_until):
    server = start_server(dp_size=1, ep_size=1)
    expert = PlacementClient(server.address, "expert-0", WorkerRole.EXPERT, "127.0.0.1:5000",
                             model_fingerprint=fingerprint, timeout_s=2)
    attention = PlacementClient(server.address, "attn-0", WorkerRole.ATTENTION, "127.0.0.1:5001",
                                model_fingerprint=fingerprint, timeout_s=2)
    try:
        expert.register(deadline_s=5)
        attention.register(deadline_s=5)
        expert.ack(1)
        attention.report_load(1, torch.ones(3, 8, dtype=torch.int64), num_passes=2)
        with pytest.raises(grpc.RpcError) as info:
            attention.report_load(1, torch.ones(3, 7, dtype=torch.int64), num_passes=2)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        workers = {w.worker_id: w for w in server.controller.list_workers()}
        assert workers["expert-0"].map_version == 1
    finally:
        expert.close()
        attention.close()


def test_client_register_waits_for_a_late_placement(start_server, fingerprint, free_port):
    port = free_port()
    client = PlacementClient(f"127.0.0.1:{port}", "expert-0", WorkerRole.EXPERT, "127.0.0.1:5000",
                             model_fingerprint=fingerprint, timeout_s=1)
    result: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: result.put(client.register(deadline_s=10)), daemon=True).start()
    try:
        threading.Event().wait(0.5)
        start_server(dp_size=1, ep_size=1, port=port)
        assert result.get(timeout=10).rank == 1
    finally:
        client.close()
    nobody = PlacementClient(f"127.0.0.1:{free_port()}", "x", WorkerRole.EXPERT, "", model_fingerprint=fingerprint,
                             timeout_s=0.2)
    try:
        with pytest.raises(TimeoutError):
            nobody.register(deadline_s=0.5)
    finally:
        nobody.close()


def test_clients_re_register_with_a_placement_that_forgot_them(start_server, connect, fingerprint, wait_until,
                                                               free_port, commit_map):
    port = free_port()
    server = start_server(dp_size=1, ep_size=1, port=port)  # no --state-db: a restart forgets everything
    clients = [PlacementClient(server.address, "expert-0", WorkerRole.EXPERT, "127.0.0.1:5000",
                               model_fingerprint=fingerprint, timeout_s=2),
               PlacementClient(server.address, "attn-0", WorkerRole.ATTENTION, "127.0.0.1:5001",
                               model_fingerprint=fingerprint, timeout_s=2)]
    seen: queue.Queue = queue.Queue()
    try:
        for client in reversed(clients):
            client.register(deadline_s=5)
        clients[0].watch(lambda phase, expert_map, data_plane:
                         seen.put((expert_map.version, data_plane.dist_init_addr)))
        assert seen.get(timeout=5) == (1, server.dist_init_addr)
        server.stop()
        restarted = start_server(dp_size=1, ep_size=1, port=port)
        wait_until(lambda: all(client.num_registrations == 2 for client in clients), timeout_s=10)
        stubs = connect(restarted.address)
        assert {w: info.rank for w, info in stubs.workers().items()} == {"attn-0": 0, "expert-0": 1}
        commit_map(restarted.controller, torch.arange(8).flip(0).repeat(3, 1))
        # The watch reconnected. Version 1 comes again only if the watch resubscribed before the push:
        # this placement forgot its rendezvous port, so the data plane changed.
        after_restart = [seen.get(timeout=5)]
        if after_restart[0][0] == 1:
            after_restart.append(seen.get(timeout=5))
        assert [version for version, _ in after_restart][-1] == 2
        assert all(addr == restarted.dist_init_addr for _, addr in after_restart)
    finally:
        for client in clients:
            client.close()


def test_initial_map_from_a_snapshot_file(start_server, connect, fingerprint, tmp_path):
    pytest.importorskip("epserve.placement_service.snapshot")
    phy2log = [[7, 6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7], [1, 0, 3, 2, 5, 4, 7, 6]]
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps({"physical_to_logical_map": phy2log}))
    server = start_server(dp_size=1, ep_size=2, init_expert_location=str(path))
    stubs = connect(server.address)
    stubs.register_all(fingerprint, dp_size=1, ep_size=2)
    response = stubs.admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5)
    assert expert_map_from_proto(response.map).phy2log.tolist() == phy2log
    # A snapshot for another deployment fails the start, not the last registration.
    with pytest.raises(ValueError, match="slots"):
        start_server(dp_size=1, ep_size=2, ep_num_redundant_experts=2, init_expert_location=str(path))
