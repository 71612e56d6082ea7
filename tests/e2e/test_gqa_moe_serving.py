"""Mixtral, GLM-4-MoE and GPT-OSS served end to end by ``epserve up`` (real processes, float64): greedy text equals
transformers', colocated (2 attention workers) and disaggregated (2 attention + 2 expert workers, 2 redundant
experts), also while the expert map changes under traffic (a snapshot import that moves every expert, then
an EPLB rebalance from the load served)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from epserve.gateway.client import generate
from epserve.protos import placement_pb2, placement_pb2_grpc
from epserve_up import epserve_up

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = [f"Story {i}: the {w} was" for i, w in enumerate(
    ["river", "mountain", "lantern", "garden", "engine", "market", "winter", "letter"])]
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["mixtral", "glm4_moe", "gpt_oss"])
def family_model(tiny_model_factory, request) -> Path:
    return tiny_model_factory(seed=3, arch=request.param, num_layers=3, num_experts=16, top_k=2, router_skew=1.2)


@pytest.fixture(scope="module")
def expected(family_model) -> list[str]:
    model = transformers.AutoModelForCausalLM.from_pretrained(family_model, dtype=torch.float64,
                                                              experts_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(family_model)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
        out.append(tok.decode(generated, skip_special_tokens=True))
    return out


def complete(gateway: str, prompt: str, timeout_s: float = 120) -> str:
    return generate(gateway, prompt, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, timeout_s=timeout_s).text


def complete_all(gateway: str) -> list[str]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: complete(gateway, p), PROMPTS))


def test_serves_what_transformers_generates(family_model, expected, tmp_path):
    common = ["--model-path", str(family_model), "--dtype", "float64", "--attention-workers", "2"]
    with epserve_up([*common, "--moe-a2a-backend", "local"], tmp_path / "colocated") as endpoints:
        assert complete_all(endpoints["gateway"]) == expected
    disaggregated = [*common, "--expert-workers", "2", "--ep-num-redundant-experts", "2",
                     "--load-report-interval-s", "0.5"]
    with epserve_up(disaggregated, tmp_path / "disaggregated") as endpoints:
        gateway = endpoints["gateway"]
        assert complete_all(gateway) == expected
        with grpc.insecure_channel(endpoints["placement"]) as channel:
            results, errors = serve_while_the_map_changes(gateway, placement_pb2_grpc.PlacementAdminStub(channel))
    assert errors == []
    assert results and all(text == expected[PROMPTS.index(prompt)] for prompt, text in results)


def serve_while_the_map_changes(gateway: str, admin) -> tuple[list[tuple[str, str]], list[str]]:
    """Two clients send prompts while every expert moves to the other worker and EPLB then rebalances."""
    results, errors, stop = [], [], threading.Event()

    def client(index: int) -> None:
        n = index
        while not stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 2
            try:
                results.append((prompt, complete(gateway, prompt, timeout_s=60)))
            except grpc.RpcError as exc:
                errors.append(f"{prompt!r}: {exc.code().name} {exc.details()}")

    clients = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for thread in clients:
        thread.start()
    try:
        start = admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5).map.version
        snapshot = json.loads(admin.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=5).json)
        half = len(snapshot["physical_to_logical_map"][0]) // 2        # 18 slots: 9 per expert worker
        snapshot["physical_to_logical_map"] = [row[half:] + row[:half] for row in snapshot["physical_to_logical_map"]]
        swapped = admin.ImportSnapshot(placement_pb2.Snapshot(json=json.dumps(snapshot)), timeout=60)
        assert swapped.version > start and swapped.experts_moved > 0
        wait_for_load(admin)
        assert admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=60).version >= swapped.version
        served = len(results)
        while len(results) < served + 4 and not errors:
            stop.wait(0.1)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=90)
    return results, errors


def wait_for_load(admin, timeout_s: float = 30.0) -> None:
    """Until the attention workers have reported load (PlanRebalance answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.PlanRebalance(placement_pb2.RebalanceRequest(), timeout=30)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
