"""Hybrid deployments end to end (issue 13 item 4): expert workers of unequal capacity, each on a device
of its own, real processes on the torch (gloo) data plane.

CPU: two CPU expert workers of capacities 1 and 0.1 (float64) serve transformers' greedy tokens, the
slow one holding fewer experts (empty slots), also after a live rebalance from reported load;
``epserve up`` without capacities registers what each worker measured (``--capacity auto``).
GPU (marked, skipped without CUDA): attention on cuda, one expert worker on cuda and one on the CPU —
the attention side sends host copies over gloo and brings the results back to its device.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.expert_map_codec import expert_map_from_proto
from epserve.gateway.client import generate
from epserve.protos import placement_pb2, placement_pb2_grpc

from epserve_up import epserve_up

pytestmark = pytest.mark.slow

PROMPTS = [f"Hybrid prompt {i}: the {w} is" for i, w in enumerate(["sky", "sea", "road", "field", "town", "hill"])]


def _admin(address: str):
    channel = grpc.insecure_channel(address)
    return channel, placement_pb2_grpc.PlacementAdminStub(channel)


def _serve_and_compare(gateway: str, reference_greedy, prompts=PROMPTS, max_new_tokens: int = 24) -> None:
    expected = [reference_greedy(p, max_new_tokens) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate(gateway, p, max_new_tokens=max_new_tokens, temperature=0.0,
                                                   timeout_s=240), prompts))
    assert [r.text for r in results] == expected


def _filled_slots(expert_map, workers, num_attention: int = 1) -> tuple[int, int]:
    """Non-empty slots of expert-0 (the fast one) and expert-1, summed over layers. A worker's slots
    are those of its data-plane index (rank − attention ranks), which follows the order the workers
    registered in, not their names."""
    per = expert_map.num_physical_slots // expert_map.num_workers

    def filled(worker_id: str) -> int:
        w = workers[worker_id].rank - num_attention
        return int((expert_map.phy2log[:, w * per:(w + 1) * per] >= 0).sum())

    return filled("expert-0"), filled("expert-1")


def test_cpu_workers_of_unequal_capacity_serve_transformers_tokens(tiny_model, tmp_path, reference_greedy):
    config = DeploymentConfig(model_path=str(tiny_model), num_attention_workers=1, num_expert_workers=2,
                              num_redundant_experts=4, dtype="float64", expert_capacities=[1.0, 0.1],
                              extra_attention_args=["--load-report-interval-s", "0.3"], log_dir=str(tmp_path))
    with LocalDeployment(config) as deployment:
        channel, admin = _admin(f"127.0.0.1:{deployment.placement_port}")
        with channel:
            workers = {w.worker_id: w for w in admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=5).workers}
            assert (workers["expert-0"].capacity, workers["expert-1"].capacity) == pytest.approx((1.0, 0.1))
            first = expert_map_from_proto(admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5).map)
            fast, slow = _filled_slots(first, workers)
            assert slow < fast, (fast, slow)                # the slow worker holds fewer experts: empty slots
            gateway = f"127.0.0.1:{deployment.gateway_port}"
            _serve_and_compare(gateway, reference_greedy)
            deadline = time.monotonic() + 30
            while True:                                     # the attention worker's load reports reach placement
                try:
                    response = admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=60)
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
            current = expert_map_from_proto(admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5).map)
            assert current.version == max(response.version, first.version)
            fast, slow = _filled_slots(current, workers)
            assert slow < fast, (fast, slow)
            _serve_and_compare(gateway, reference_greedy, PROMPTS[::-1])


def test_epserve_up_registers_the_capacities_the_workers_measured(tiny_model, tmp_path, reference_greedy):
    args = ["--model-path", str(tiny_model), "--dtype", "float64", "--attention-workers", "1",
            "--expert-workers", "2", "--expert-num-threads", "1,2", "--expert-devices", "cpu,cpu"]
    with epserve_up(args, tmp_path) as endpoints:
        channel, admin = _admin(endpoints["placement"])
        with channel:
            workers = [w for w in admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=5).workers
                       if w.role == placement_pb2.WORKER_ROLE_EXPERT]
        assert len(workers) == 2 and all(w.device == "cpu" for w in workers)
        assert all(0 < w.capacity < 10 and w.capacity != 1.0 for w in workers), workers   # TFLOP/s, measured
        _serve_and_compare(endpoints["gateway"], reference_greedy, PROMPTS[:2], 16)
    logs = "".join(p.read_text() for p in tmp_path.glob("expert-*.log"))
    assert logs.count("measured capacity") == 2, logs[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_attention_with_a_gpu_and_a_cpu_expert_worker(tiny_model, tmp_path, reference_greedy):
    """float64 on both devices (the torch attention path and the torch MoE runner): greedy tokens equal
    transformers' on the CPU. Each expert worker registers the capacity it measured on its device
    (on the tiny model the GPU's launch overhead can make the CPU worker the faster one)."""
    config = DeploymentConfig(model_path=str(tiny_model), num_attention_workers=1, num_expert_workers=2,
                              num_redundant_experts=2, dtype="float64", attention_device="cuda:0",
                              expert_devices=["cuda:0", "cpu"], expert_capacities="auto",
                              attention_backend="torch_native",
                              log_dir=str(tmp_path))
    with LocalDeployment(config) as deployment:
        channel, admin = _admin(f"127.0.0.1:{deployment.placement_port}")
        with channel:
            workers = {w.worker_id: w for w in admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=5).workers}
            assert (workers["expert-0"].device, workers["expert-1"].device) == ("cuda:0", "cpu")
            assert workers["attention-0"].device == "cuda:0"
            assert all(workers[w].capacity > 0 and workers[w].capacity != 1.0 for w in ("expert-0", "expert-1"))
            _serve_and_compare(f"127.0.0.1:{deployment.gateway_port}", reference_greedy)
