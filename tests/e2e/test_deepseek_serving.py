"""DeepSeek-V3 and DeepSeek-V2 served end to end (real processes, float64): greedy text equals
transformers', colocated and disaggregated (2 attention + 2 expert workers, 2 redundant experts),
also while the expert map changes under traffic (a group-aware EPLB plan and a snapshot import that
moves every expert)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.gateway.client import generate
from epserve.protos import placement_pb2, placement_pb2_grpc

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = [f"Story {i}: the {w} was" for i, w in enumerate(
    ["river", "mountain", "lantern", "garden", "engine", "market", "winter", "letter"])]
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def deepseek_model(tiny_model_factory, request) -> Path:
    return tiny_model_factory(seed=3, arch=request.param, num_layers=3, num_experts=16, top_k=2, router_skew=1.2)


@pytest.fixture(scope="module")
def expected(deepseek_model) -> dict[str, str]:
    model = transformers.AutoModelForCausalLM.from_pretrained(deepseek_model, dtype=torch.float64,
                                                              experts_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(deepseek_model)
    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
        out[prompt] = tok.decode(generated, skip_special_tokens=True)
    return out


def complete_all(gateway: str) -> list[str]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: generate(gateway, p, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                                timeout_s=120).text, PROMPTS))


def test_colocated_deployment_matches_transformers(deepseek_model, expected, tmp_path):
    config = DeploymentConfig(model_path=str(deepseek_model), num_attention_workers=2, num_expert_workers=0,
                              moe_a2a_backend="local", dtype="float64", log_dir=str(tmp_path / "logs"))
    with LocalDeployment(config) as deployment:
        assert complete_all(f"127.0.0.1:{deployment.gateway_port}") == [expected[p] for p in PROMPTS]


def test_disaggregated_matches_transformers_while_the_map_changes(deepseek_model, expected, tmp_path):
    config = DeploymentConfig(model_path=str(deepseek_model), num_attention_workers=2, num_expert_workers=2,
                              num_redundant_experts=2, dtype="float64", log_dir=str(tmp_path / "logs"),
                              extra_attention_args=["--load-report-interval-s", "0.5"])
    with LocalDeployment(config) as deployment:
        gateway = f"127.0.0.1:{deployment.gateway_port}"
        assert complete_all(gateway) == [expected[p] for p in PROMPTS]
        admin = placement_pb2_grpc.PlacementAdminStub(grpc.insecure_channel(f"127.0.0.1:{deployment.placement_port}"))
        results, errors, stop = [], [], threading.Event()

        def client(index: int) -> None:
            n = index
            while not stop.is_set():
                prompt = PROMPTS[n % len(PROMPTS)]
                n += 2
                try:
                    results.append((prompt, generate(gateway, prompt, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                                     timeout_s=60).text))
                except grpc.RpcError as exc:
                    errors.append(f"{prompt!r}: {exc.code().name} {exc.details()}")

        clients = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for thread in clients:
            thread.start()
        try:
            start = admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5).map.version
            # every expert moves to the other worker, under traffic
            snapshot = json.loads(admin.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=5).json)
            snapshot["physical_to_logical_map"] = [row[9:] + row[:9] for row in snapshot["physical_to_logical_map"]]
            swapped = admin.ImportSnapshot(placement_pb2.Snapshot(json=json.dumps(snapshot)), timeout=60)
            assert swapped.version > start and swapped.experts_moved > 0
            # the model's 4 expert groups make auto planning group-aware; plan from the load served
            planned = wait_for_plan(admin)
            assert planned.algorithm == "deepseek_hierarchical"
            rebalanced = admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=60)
            assert rebalanced.version >= swapped.version
            served = len(results)
            while len(results) < served + 4 and not errors:
                stop.wait(0.1)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=90)
    assert errors == []
    assert results and all(text == expected[prompt] for prompt, text in results)


def wait_for_plan(admin, timeout_s: float = 30.0) -> placement_pb2.PlanRebalanceResponse:
    """PlanRebalance once the attention workers have reported load."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return admin.PlanRebalance(placement_pb2.RebalanceRequest(), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
