"""PlacementAdmin/DumpExpertDistribution and ``epserve admin dump-expert-distribution``: an
in-process placement service fanning out to two real attention-worker gRPC services over real
engines (one recording per_pass, one in stat mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.engine_loop import EngineLoop
from epserve.attention_worker.expert_recorder import RecorderMode
from epserve.sampling import SamplingParams
from epserve.attention_worker.service import AttentionWorkerService
from epserve.grpc_server import serve_grpc
from epserve.protos import placement_pb2, worker_pb2_grpc

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]
ATTENTION = placement_pb2.WORKER_ROLE_ATTENTION


@pytest.fixture(scope="module")
def attention_services(tiny_model):
    """worker id → address of a real AttentionWorker service whose engine served one prompt."""
    servers, addresses = [], {}
    for worker_id, mode in (("attn-0", RecorderMode.PER_PASS), ("attn-1", RecorderMode.STAT)):
        engine = build_colocated_engine(str(tiny_model), torch.float32, recorder_mode=mode)
        generate_tokens(engine, [[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True))
        loop = EngineLoop(engine)
        server = serve_grpc([(worker_pb2_grpc.add_AttentionWorkerServicer_to_server,
                              AttentionWorkerService(worker_id, 1000, lambda loop=loop: loop),
                              "epserve.v1.AttentionWorker")], "127.0.0.1", 0)
        servers.append(server)
        addresses[worker_id] = f"127.0.0.1:{server.port}"
    yield addresses
    for server in servers:
        server.stop(0.5)


@pytest.fixture
def placement(start_server, connect):
    server = start_server(heartbeat_timeout_ms=120_000)    # registered fakes never heartbeat
    stubs = connect(server.address)
    return server, stubs


def _request(directory: str) -> placement_pb2.AdminDumpExpertDistributionRequest:
    return placement_pb2.AdminDumpExpertDistributionRequest(directory=directory, worker_timeout_s=10)


def admin(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epserve", "admin", "--placement", address, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_fans_out_to_every_attention_worker(placement, attention_services, fingerprint, tmp_path):
    server, stubs = placement
    with pytest.raises(grpc.RpcError) as failed:            # nobody registered yet
        stubs.admin.DumpExpertDistribution(_request(str(tmp_path)), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "no live attention worker" in failed.value.details()
    for worker_id, address in attention_services.items():
        stubs.register(worker_id, ATTENTION, fingerprint, address=address)

    results = {w.worker_id: w for w in stubs.admin.DumpExpertDistribution(_request(str(tmp_path)), timeout=30).workers}
    assert set(results) == {"attn-0", "attn-1"}
    ok, stat = results["attn-0"], results["attn-1"]
    assert ok.status_code == "OK" and ok.mode == "per_pass" and ok.num_passes == 2 and ok.num_token_records == 0
    assert Path(ok.path).parent == tmp_path and len(torch.load(ok.path)["per_pass"]) == 2
    assert stat.status_code == "FAILED_PRECONDITION" and stat.address == attention_services["attn-1"]
    assert "--expert-distribution-recorder-mode per_pass|per_token" in stat.message

    for directory, words in (("", "directory is empty"), ("dumps", "directory 'dumps' is relative")):
        with pytest.raises(grpc.RpcError) as failed:
            stubs.admin.DumpExpertDistribution(_request(directory), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in failed.value.details()


def test_cli_prints_each_worker_and_fails_when_one_did(placement, attention_services, fingerprint, tmp_path):
    server, stubs = placement
    for worker_id, address in attention_services.items():
        stubs.register(worker_id, ATTENTION, fingerprint, address=address)

    done = admin(server.address, "dump-expert-distribution", str(tmp_path / "out"), "--json")
    assert done.returncode == 1, done.stderr                # attn-1 records in stat mode
    rows = {r["worker_id"]: r for r in json.loads(done.stdout)["workers"]}
    assert rows["attn-0"]["status_code"] == "OK" and Path(rows["attn-0"]["path"]).is_file()
    assert rows["attn-1"]["status_code"] == "FAILED_PRECONDITION"
    assert "epserve admin: dump-expert-distribution: attn-1: FAILED_PRECONDITION: " in done.stderr

    text = admin(server.address, "dump-expert-distribution", str(tmp_path / "out"))
    assert text.returncode == 1 and text.stdout.startswith("attn-0: wrote ") and "(per_pass, 0 passes)" in text.stdout

    relative = admin(server.address, "dump-expert-distribution", "out")
    assert relative.returncode == 1 and "INVALID_ARGUMENT" in relative.stderr and "directory" in relative.stderr
