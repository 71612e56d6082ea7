"""``epserve up --moe-a2a-backend local``: placement, attention workers that hold every expert, the
gateway, and no expert workers; real processes, greedy text equal to ``epserve generate --model-path``."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from epserve.gateway.client import generate
from epserve_up import REPO_ROOT, epserve_up
from epserve.protos import placement_pb2, placement_pb2_grpc

pytestmark = pytest.mark.slow

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
    up_args = ["--model-path", str(tiny_model), "--moe-a2a-backend", "local",
               "--attention-workers", str(num_attention_workers), *model_args]
    with epserve_up(up_args, tmp_path / "logs") as endpoints:
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
