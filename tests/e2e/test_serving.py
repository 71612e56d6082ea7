"""Disaggregated serving end to end: gateway → attention workers → expert workers, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.gateway.client import abort, generate, stream_generate
from epserve.protos import generation_pb2, placement_pb2, placement_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow

PROMPTS = [f"Prompt number {i}: the {w} of the day is" for i, w in enumerate(
    ["weather", "news", "mood", "plan", "menu", "song", "story", "colour", "game", "book", "word", "price",
     "topic", "question", "answer", "schedule"])]


def gateway_address(deployment) -> str:
    return f"127.0.0.1:{deployment.gateway_port}"


def test_cli_client_prints_transformers_greedy_text(deployment, reference_greedy):
    prompt = "Once upon a time"
    result = subprocess.run([sys.executable, "-m", "epserve", "generate", "--gateway", gateway_address(deployment),
                             "--prompt", prompt, "--max-new-tokens", "32", "--temperature", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference_greedy(prompt, 32)


def test_sixteen_concurrent_clients_match_transformers(deployment, reference_greedy):
    expected = [reference_greedy(p, 32) for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: generate(gateway_address(deployment), p, max_new_tokens=32,
                                                   temperature=0.0, timeout_s=180), PROMPTS))
    assert [r.text for r in results] == expected
    assert all(r.final.usage.completion_tokens > 0 for r in results)


def test_mixed_sampling_settings_all_finish_and_seeds_repeat(deployment):
    settings = [dict(temperature=0.8, top_p=0.9, seed=7), dict(temperature=1.2, top_k=20, seed=3),
                dict(temperature=0.7, min_p=0.1, seed=11, repetition_penalty=1.3), dict(temperature=0.0)]
    jobs = [(f"mixed {i}", s) for i, s in enumerate(settings)] * 2
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: generate(gateway_address(deployment), job[0], max_new_tokens=12,
                                                     ignore_eos=True, timeout_s=180, **job[1]), jobs))
    for result in results:
        assert result.final.finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert len(result.token_ids) == 12
    half = len(settings)
    assert [r.token_ids for r in results[:half]] == [r.token_ids for r in results[half:]]


def test_abort_ends_stream_and_frees_kv_blocks(deployment):
    address = gateway_address(deployment)
    stream = stream_generate(address, "a long story", request_id="long-1", max_new_tokens=1500,
                             ignore_eos=True, temperature=0.0, timeout_s=120)
    first = next(stream)
    assert not first.finished
    assert abort(address, "long-1")
    last = None
    for last in stream:
        pass
    assert last is not None and last.finished and last.finish_reason == generation_pb2.FINISH_REASON_ABORT
    assert last.usage.completion_tokens < 1500
    assert_all_kv_blocks_free(deployment)


def assert_all_kv_blocks_free(deployment, timeout_s: float = 10.0) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{deployment.placement_port}") as channel:
        workers = placement_pb2_grpc.PlacementAdminStub(channel).ListWorkers(
            placement_pb2.ListWorkersRequest(), timeout=5).workers
    for worker in workers:
        if worker.role != placement_pb2.WORKER_ROLE_ATTENTION:
            continue
        with grpc.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.AttentionWorkerStub(channel)
            deadline = time.monotonic() + timeout_s
            while True:
                load = stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
                if load.kv_blocks_free == load.kv_blocks_total and load.num_running == 0:
                    break
                assert time.monotonic() < deadline, f"{worker.worker_id} still holds KV blocks: {load}"
                time.sleep(0.1)


def test_client_cancel_frees_kv_blocks(deployment):
    stream = stream_generate(gateway_address(deployment), "cancel me", max_new_tokens=1500, ignore_eos=True,
                             timeout_s=120)
    next(stream)
    stream.close()                     # cancels the RPC
    assert_all_kv_blocks_free(deployment)


def test_health_reports_serving(deployment):
    with grpc.insecure_channel(gateway_address(deployment)) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="hi", max_new_tokens=0), "max_new_tokens"),
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", stop_token_ids=[10 ** 6]), "stop_token_ids"),
    (dict(prompt="word " * 5000), "prompt"),
])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(deployment, kwargs, field):
    prompt = kwargs.pop("prompt")
    with pytest.raises(grpc.RpcError) as info:
        generate(gateway_address(deployment), prompt, timeout_s=30, **kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    ok = generate(gateway_address(deployment), "still alive", max_new_tokens=2, temperature=0.0, timeout_s=60)
    assert ok.final.finished


def test_epserve_up_serves_and_sigterm_leaves_no_process(tiny_model, tmp_path, reference_greedy):
    proc = subprocess.Popen([sys.executable, "-m", "epserve", "up", "--model-path", str(tiny_model),
                             "--attention-workers", "1", "--expert-workers", "2", "--dtype", "float64",
                             "--port", "0", "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = None
        deadline = time.monotonic() + 180
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "epserve up exited before printing its endpoints"
            if line.startswith("gateway"):
                address = line.split()[1]
        assert address
        children = child_pids(proc.pid)
        assert len(children) == 5                       # placement, 2 experts, 1 attention, gateway
        assert generate(address, "Once upon a time", max_new_tokens=8, temperature=0.0,
                        timeout_s=60).text == reference_greedy("Once upon a time", 8)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    time.sleep(0.5)
    assert [pid for pid in children if pid_alive(pid)] == []


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False
