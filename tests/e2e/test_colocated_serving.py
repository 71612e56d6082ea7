"""``epserve up --moe-a2a-backend local``: placement, attention workers that hold every expert, the
gateway, and no expert workers; real processes, greedy text equal to ``epserve generate --model-path``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from epserve.gateway.client import generate
from epserve.protos import placement_pb2, placement_pb2_grpc

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Once upon a time", "The colour of the sea is"]


def test_up_local_serves_what_generate_computes(tiny_model, tmp_path):
    serve_and_compare(tiny_model, tmp_path, ["--dtype", "float64"], num_attention_workers=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_up_local_on_a_gpu_serves_what_generate_computes(tiny_model, tmp_path):
    """One GPU: the attention worker runs the batched GPU runner with CUDA graphs."""
    serve_and_compare(tiny_model, tmp_path, ["--dtype", "float32", "--device", "cuda"], num_attention_workers=1)


def serve_and_compare(tiny_model, tmp_path, model_args: list[str], num_attention_workers: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    expected = []
    for prompt in PROMPTS:
        colocated = subprocess.run([sys.executable, "-m", "epserve", "generate", "--model-path", str(tiny_model),
                                    *model_args, "--prompt", prompt, "--max-new-tokens", "24",
                                    "--temperature", "0"], capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
                                   env=env)
        assert colocated.returncode == 0, colocated.stderr
        expected.append(colocated.stdout)
    assert all(expected)
    up = subprocess.Popen([sys.executable, "-m", "epserve", "up", "--model-path", str(tiny_model),
                           "--moe-a2a-backend", "local", "--attention-workers", str(num_attention_workers),
                           *model_args, "--port", "0", "--log-dir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=open(tmp_path / "up.log", "w"), text=True, cwd=REPO_ROOT,
                          env=env)
    try:
        endpoints = {}
        for line in up.stdout:          # printed once the deployment is ready
            name, _, rest = line.partition(" ")
            if name in ("gateway", "placement"):
                endpoints[name] = rest.split()[0]
            if len(endpoints) == 2:
                break
        assert len(endpoints) == 2, (tmp_path / "up.log").read_text()

        served = subprocess.run([sys.executable, "-m", "epserve", "generate", "--gateway", endpoints["gateway"],
                                 "--prompt", PROMPTS[0], "--max-new-tokens", "24", "--temperature", "0"],
                                capture_output=True, text=True, timeout=180, cwd=REPO_ROOT, env=env)
        assert served.returncode == 0, served.stderr
        assert served.stdout == expected[0]
        with ThreadPoolExecutor(8) as pool:     # enough at once that both attention workers serve some
            results = list(pool.map(lambda p: generate(endpoints["gateway"], p, max_new_tokens=24, temperature=0.0,
                                                       timeout_s=180), PROMPTS * 4))
        assert [r.text for r in results] == expected * 4

        with grpc.insecure_channel(endpoints["placement"]) as channel:
            workers = placement_pb2_grpc.PlacementAdminStub(channel).ListWorkers(
                placement_pb2.ListWorkersRequest(), timeout=5).workers
        assert sorted(w.worker_id for w in workers) == [f"attention-{i}" for i in range(num_attention_workers)]
        assert not list((tmp_path / "logs").glob("expert-*.log"))
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()
