"""The cuda_ipc step path end to end on the CPU: ``epserve up --moe-a2a-backend cuda_ipc
--attention-backend triton`` runs the batched GPU runner (Triton interpreter on the CPU) whose MoE
exchange is announced once per step (attention_worker/step_experts.py) over host shared memory.
Greedy text equals the colocated engine's with the same attention kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from epserve.gateway.client import generate
from epserve_up import REPO_ROOT, epserve_up

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "The colour of the sea is"]
CPU_ARGS = ["--dtype", "float32", "--attention-backend", "triton"]
GPU_ARGS = ["--dtype", "bfloat16", "--device", "cuda"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU variant (Triton interpreter)")
def test_step_path_on_the_cpu(tiny_model, tmp_path):
    serve_and_compare(tiny_model, tmp_path, CPU_ARGS, {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_path_on_one_gpu(tiny_model, tmp_path):
    """1 attention + 2 expert processes on one GPU: device flags, both sides in CUDA graphs."""
    serve_and_compare(tiny_model, tmp_path, GPU_ARGS, {})
    for name in ("expert-0.log", "expert-1.log"):
        assert "captured the expert step" in (tmp_path / "logs" / name).read_text()


def serve_and_compare(tiny_model, tmp_path, model_args: list[str], extra_env: dict[str, str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra_env)
    expected = []
    for prompt in PROMPTS:
        colocated = subprocess.run([sys.executable, "-m", "epserve", "generate", "--model-path", str(tiny_model),
                                    *model_args, "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"],
                                   capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
        assert colocated.returncode == 0, colocated.stderr
        expected.append(colocated.stdout)
    args = ["--model-path", str(tiny_model), "--moe-a2a-backend", "cuda_ipc", "--attention-workers", "1",
            "--expert-workers", "2", "--ep-num-redundant-experts", "2", *model_args]
    os.environ.update(extra_env)                    # the deployment's processes inherit it
    with epserve_up(args, tmp_path / "logs") as endpoints:
        served = [generate(endpoints["gateway"], p, max_new_tokens=12, temperature=0.0, timeout_s=300).text
                  for p in PROMPTS]
        attention_log = (tmp_path / "logs" / "attention-0.log").read_text()
    assert served == expected
    assert "the cuda_ipc step path" in attention_log
