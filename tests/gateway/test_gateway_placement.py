"""Worker discovery through a placement service (a PlacementAdmin double serving ListWorkers)."""

from __future__ import annotations

import threading

import grpc
from gateway_testlib import FakeWorker, GatewayProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.grpc_server import serve_grpc
from epserve.gateway import client
from epserve.protos import placement_pb2, placement_pb2_grpc


class ListedWorkers(placement_pb2_grpc.PlacementAdminServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.workers: list[placement_pb2.WorkerInfo] = []

    def ListWorkers(self, request, context):
        with self.lock:
            return placement_pb2.ListWorkersResponse(workers=self.workers)


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_gateway_discovers_alive_attention_workers(tmp_path, gateway_model_dir, gateway_tokenizer) -> None:
    script = gateway_tokenizer.encode("discovered ✓")
    worker = FakeWorker(tmp_path, "p", script, 0.005, -1)
    listing = ListedWorkers()
    role, state = placement_pb2.WORKER_ROLE_ATTENTION, placement_pb2.WORKER_STATE_SUSPECT
    listing.workers = [placement_pb2.WorkerInfo(worker_id="a0", role=role, address=worker.address, state=state),
                       placement_pb2.WorkerInfo(worker_id="e0", role=placement_pb2.WORKER_ROLE_EXPERT,
                                                address="127.0.0.1:1", state=placement_pb2.WORKER_STATE_ALIVE)]
    placement = serve_grpc([(placement_pb2_grpc.add_PlacementAdminServicer_to_server, listing,
                             "epserve.v1.PlacementAdmin")], "127.0.0.1", 0)
    gateway = GatewayProcess(tmp_path, gateway_model_dir, [], "--placement", f"127.0.0.1:{placement.port}")
    try:
        info = client.get_model_info(gateway.address)
        assert (info.num_attention_workers, info.num_expert_workers) == (0, 1)   # the attention worker is SUSPECT
        assert health_status(gateway.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with listing.lock:
            listing.workers[0].state = placement_pb2.WORKER_STATE_ALIVE
        client.wait_until_serving(gateway.address, 10)
        result = client.generate(gateway.address, "hi", max_new_tokens=len(script))
        assert result.text == "discovered ✓"
        assert client.get_model_info(gateway.address).num_attention_workers == 1
    finally:
        gateway.stop()
        worker.stop()
        placement.stop(0)


def test_worker_not_serving_yet_is_not_routed_to(tmp_path, gateway_model_dir) -> None:
    worker = FakeWorker(tmp_path, "late", [40, 41], 0.005, -1, "--serving-after-s", "1.5")
    gateway = GatewayProcess(tmp_path, gateway_model_dir, [worker.address])
    try:
        assert health_status(gateway.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            list(client.stream_generate(gateway.address, token_ids=[1], max_new_tokens=2, timeout_s=10))
            raise AssertionError("a request was served before any worker was SERVING")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
        client.wait_until_serving(gateway.address, 10)
        assert client.generate(gateway.address, token_ids=[1], max_new_tokens=2).token_ids == [40, 41]
    finally:
        gateway.stop()
        worker.stop()
