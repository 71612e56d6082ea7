"""The cuda_ipc step path end to end on the CPU: ``epserve up --moe-a2a-backend cuda_ipc
--attention-backend triton`` runs the batched GPU runner (Triton interpreter on the CPU) whose MoE
exchange is announced once per step (attention_worker/step_experts.py) over host shared memory.
Greedy text equals the colocated engine's with the same attention kernels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from epserve.gateway.client import generate
from epserve.protos import placement_pb2, placement_pb2_grpc
from epserve_up import REPO_ROOT, epserve_up

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "The colour of the sea is"]
CPU_ARGS = ["--dtype", "float32", "--attention-backend", "triton"]
GPU_ARGS = ["--dtype", "bfloat16", "--device", "cuda"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU variant (Triton interpreter)")
def test_step_path_on_the_cpu(tiny_model, tmp_path):
    serve_and_compare(tiny_model, tmp_path, CPU_ARGS, {"TRITON_INTERPRET": "1"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU variant (Triton interpreter)")
def test_two_micro_batches_on_the_step_path_on_the_cpu(tiny_model, tmp_path):
    """--num-micro-batches 2: the prompts decode together, each step as two halves interleaved layer by
    layer through two channel slots (one expert thread each); the text is the colocated engine's."""
    serve_and_compare(tiny_model, tmp_path, CPU_ARGS, {"TRITON_INTERPRET": "1"}, micro_batches=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("experts", [1, 2])
def test_step_path_on_one_gpu(tiny_model, tmp_path, experts):
    """1 attention + 1 or 2 expert processes on one GPU: device flags, both sides in CUDA graphs, the
    fused hand-offs (with one expert worker the attention side's receive is one too)."""
    serve_and_compare(tiny_model, tmp_path, GPU_ARGS, {}, experts)
    for worker in range(experts):
        assert "captured the expert step" in (tmp_path / "logs" / f"expert-{worker}.log").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_micro_batches_are_refused_on_the_gpu_step_path(tiny_model, tmp_path, monkeypatch):
    """On a GPU two micro-batches deadlocked an expert worker's graph capture (48 layers, H100): the
    attention worker refuses them at start-up with the reason, instead of hanging (unless
    EPSERVE_GPU_TWO_MICRO_BATCHES=1)."""
    from epserve.attention_worker.step_experts import GPU_TWO_MICRO_BATCHES, GPU_TWO_MICRO_BATCHES_ENV

    monkeypatch.delenv(GPU_TWO_MICRO_BATCHES_ENV, raising=False)

    args = split_args(tiny_model, GPU_ARGS) + ["--num-micro-batches", "2"]
    up = subprocess.run([sys.executable, "-m", "epserve", "up", "--port", "0", "--no-auth-token", *args,
                         "--log-dir", str(tmp_path / "logs")],
                        capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert up.returncode != 0
    assert GPU_TWO_MICRO_BATCHES.split(";")[0] in (tmp_path / "logs" / "attention-0.log").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("experts", [1, 2])
def test_two_micro_batches_on_the_gpu_step_path(tiny_model_factory, tmp_path, monkeypatch, experts):
    """EPSERVE_GPU_TWO_MICRO_BATCHES=1 lifts the refusal: each expert worker serves an attention rank's
    step — both halves — from one thread, enqueued in the rank's order (dataplane/cuda_ipc_step_server.py),
    so nothing it waits for on the host depends on a launch it has not made (a graph capture, then a first
    eager step, hung a 48-layer deployment at start-up when each slot had a thread of its own). A 48-layer
    tiny model, the prompts decoding together in halves: the deployment serves them, every expert worker
    captured both slots' steps, and the text is the colocated engine's."""
    from epserve.attention_worker.step_experts import GPU_TWO_MICRO_BATCHES_ENV

    model = tiny_model_factory(num_layers=48)
    expected = colocated_texts(model, GPU_ARGS, {})
    monkeypatch.setenv(GPU_TWO_MICRO_BATCHES_ENV, "1")
    served = serve_split(model, tmp_path, GPU_ARGS, {}, experts, micro_batches=2)
    for worker in range(experts):
        log = (tmp_path / "logs" / f"expert-{worker}.log").read_text()
        captured = set(re.findall(r"captured the expert step of \d+ tokens x 48 layers \(map version \d+, "
                                  r"micro-batch slot (\d)\)", log))
        assert captured == {"0", "1"}, (worker, captured)
    assert served == expected


def colocated_texts(tiny_model, model_args: list[str], extra_env: dict[str, str]) -> list[str]:
    """What ``epserve generate`` (one process, the same attention kernels) writes for each prompt."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra_env)
    expected = []
    for prompt in PROMPTS:
        colocated = subprocess.run([sys.executable, "-m", "epserve", "generate", "--model-path", str(tiny_model),
                                    *model_args, "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"],
                                   capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
        assert colocated.returncode == 0, colocated.stderr
        expected.append(colocated.stdout)
    return expected


def split_args(tiny_model, model_args: list[str], experts: int = 2) -> list[str]:
    return ["--model-path", str(tiny_model), "--moe-a2a-backend", "cuda_ipc", "--attention-workers", "1",
            "--expert-workers", str(experts), "--ep-num-redundant-experts", str(2 * (experts - 1)), *model_args]


def serve_and_compare(tiny_model, tmp_path, model_args: list[str], extra_env: dict[str, str],
                      experts: int = 2, micro_batches: int = 1) -> None:
    expected = colocated_texts(tiny_model, model_args, extra_env)
    assert serve_split(tiny_model, tmp_path, model_args, extra_env, experts, micro_batches) == expected


def serve_split(tiny_model, tmp_path, model_args: list[str], extra_env: dict[str, str], experts: int = 2,
                micro_batches: int = 1) -> list[str]:
    """The split deployment's text for each prompt: one request at a time with one micro-batch; with two,
    the prompts at once (decode steps of two sequences, split in halves)."""
    args = split_args(tiny_model, model_args, experts) + ["--num-micro-batches", str(micro_batches)]
    os.environ.update(extra_env)                    # the deployment's processes inherit it
    with epserve_up(args, tmp_path / "logs") as endpoints:
        def serve(prompt: str) -> str:
            return generate(endpoints["gateway"], prompt, max_new_tokens=12, temperature=0.0, timeout_s=300).text

        if micro_batches == 1:
            served = [serve(p) for p in PROMPTS]
        else:
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                served = list(pool.map(serve, PROMPTS))
        attention_log = (tmp_path / "logs" / "attention-0.log").read_text()
    assert "the cuda_ipc step path" in attention_log
    if micro_batches == 2:
        assert "two micro-batches in flight" in attention_log
    return served


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU variant (Triton interpreter)")
def test_a_live_map_change_on_the_step_path(tiny_model, tmp_path):
    """Traffic through the step path while placement moves every expert to the other expert worker
    (a snapshot with each layer's slots swapped between the two): steps announced under the old map
    version are redone under the new one, and every completion equals the colocated engine's."""
    extra_env = {"TRITON_INTERPRET": "1"}
    expected = dict(zip(PROMPTS, colocated_texts(tiny_model, CPU_ARGS, extra_env)))
    os.environ.update(extra_env)
    results, errors, stop = [], [], threading.Event()
    with epserve_up(split_args(tiny_model, CPU_ARGS), tmp_path / "logs") as endpoints:
        def traffic() -> None:
            while not stop.is_set():
                for prompt in PROMPTS:
                    try:
                        text = generate(endpoints["gateway"], prompt, max_new_tokens=12, temperature=0.0,
                                        timeout_s=300).text
                    except grpc.RpcError as exc:
                        errors.append(f"{prompt!r}: {exc.code().name} {exc.details()}")
                        continue
                    results.append((prompt, text))

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            wait_until(lambda: len(results) >= 1, 300, "traffic")
            with grpc.insecure_channel(endpoints["placement"]) as channel:
                admin = placement_pb2_grpc.PlacementAdminStub(channel)
                snapshot = json.loads(admin.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=10).json)
                half = len(snapshot["physical_to_logical_map"][0]) // 2
                snapshot["physical_to_logical_map"] = [row[half:] + row[:half]
                                                       for row in snapshot["physical_to_logical_map"]]
                before = admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=10).map.version
                swapped = admin.ImportSnapshot(placement_pb2.Snapshot(json=json.dumps(snapshot)), timeout=240)
                assert swapped.version > before and swapped.experts_moved > 0
            done_before = len(results)
            wait_until(lambda: len(results) >= done_before + 2, 300, "traffic on the new map")
        finally:
            stop.set()
            thread.join(timeout=300)
    assert errors == []
    wrong = [(prompt, text) for prompt, text in results if text != expected[prompt]]
    assert wrong == [], wrong


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU variant (Triton interpreter)")
def test_an_expert_worker_lost_and_restarted_on_the_step_path(tiny_model, tmp_path, monkeypatch):
    """Elastic EP on the step path. Wave 1: kill -9 one of three expert workers while four greedy streams
    decode; placement re-places its experts on the survivors, the attention worker redoes the failed step
    under that map and leaves the lost worker out of every step from then on. Then the worker is started
    again (its own command): it maps the attention worker's channels again, placement gives it experts, and
    the attention worker takes the new process. Wave 2 runs with it serving. Every completion of both waves
    equals the colocated engine's, none failed."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lose_and_restart_an_expert_worker(tiny_model, tmp_path, CPU_ARGS, {"TRITON_INTERPRET": "1"},
                                      dict(dtype="float32", attention_backend="triton"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_expert_worker_lost_and_restarted_on_one_gpu(tiny_model, tmp_path):
    """The same on one GPU: device flags, both sides in CUDA graphs (the attention worker's decode graphs are
    captured again when the lost worker is left out and when the restarted one comes back), the restarted
    process opening the attention worker's GPU memory from its IPC handle."""
    lose_and_restart_an_expert_worker(tiny_model, tmp_path, GPU_ARGS, {}, dict(dtype="bfloat16", device="cuda"))
    assert "capturing the decode graphs again" in (tmp_path / "logs" / "attention-0.log").read_text()


def lose_and_restart_an_expert_worker(tiny_model, tmp_path, model_args: list[str], extra_env: dict[str, str],
                                      deployment_options: dict) -> None:
    import signal
    import socket
    import subprocess

    from epserve.deployment import Child, LocalDeployment
    from epserve.deployment_config import DeploymentConfig
    from epserve.gateway.client import stream_generate
    from epserve.protos import placement_pb2, placement_pb2_grpc

    expected = dict(zip(PROMPTS, colocated_texts(tiny_model, model_args, extra_env)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        placement_port = sock.getsockname()[1]
    config = DeploymentConfig(
        model_path=str(tiny_model), num_attention_workers=1, num_expert_workers=3, num_redundant_experts=4,
        moe_a2a_backend="cuda_ipc", placement_port=placement_port, state_db=str(tmp_path / "placement.db"),
        log_dir=str(tmp_path / "logs"), extra_placement_args=["--elastic-ep-backend", "placement"],
        **deployment_options)
    prompts = PROMPTS * 2

    def wave(gateway: str, fault=None) -> tuple[dict[int, str], list[str]]:
        texts: dict[int, str] = {}
        errors: list[str] = []
        arrivals = [0] * len(prompts)

        def stream(index: int) -> None:
            parts = []
            try:
                for response in stream_generate(gateway, prompts[index], max_new_tokens=12, temperature=0.0,
                                                timeout_s=300):
                    parts.append(response.text)
                    arrivals[index] += len(response.token_ids)
                texts[index] = "".join(parts)
            except grpc.RpcError as exc:
                errors.append(f"stream {index}: {exc.code().name} {exc.details()}")

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        if fault is not None:
            wait_until(lambda: min(arrivals) >= 2 or not any(t.is_alive() for t in threads), 300, "the streams")
            fault()
        for thread in threads:
            thread.join(timeout=300)
        return texts, errors

    want = {i: expected[p] for i, p in enumerate(prompts)}
    with LocalDeployment(config) as deployment:
        gateway = f"127.0.0.1:{deployment.gateway_port}"
        victim = next(c for c in deployment.children if c.name == "expert-1").process
        command = list(victim.args)

        def kill() -> None:
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)

        texts, errors = wave(gateway, kill)
        assert errors == [] and texts == want

        log = open(tmp_path / "logs" / "expert-1-restarted.log", "ab")
        restarted = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        deployment.children.append(Child("expert-1", restarted))
        threading.Thread(target=lambda: [None for _ in restarted.stdout], daemon=True).start()
        with grpc.insecure_channel(f"127.0.0.1:{placement_port}") as channel:
            admin = placement_pb2_grpc.PlacementAdminStub(channel)

            def holds_experts() -> bool:
                view = admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=10).map
                owners, per = list(view.slot_owners), view.num_physical_slots // len(view.slot_owners)
                start = owners.index("expert-1") * per
                return any(view.phy2log[layer * view.num_physical_slots + start + j] >= 0
                           for layer in range(view.num_layers) for j in range(per))

            wait_until(holds_experts, 120, "the restarted expert worker to hold experts")
        texts, errors = wave(gateway)
        assert restarted.poll() is None, "the restarted expert worker exited"
        attention_log = (tmp_path / "logs" / "attention-0.log").read_text()
    assert errors == [] and texts == want
    assert "redoing the failed exchange under map version" in attention_log     # the recovery adopted a new map
    assert "joined again" in attention_log                                       # and took the new process

