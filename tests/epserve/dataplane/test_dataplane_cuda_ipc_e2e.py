"""``epserve up --moe-a2a-backend cuda_ipc`` on the CPU (host shared memory): 2 attention workers, 2
expert workers, real processes; greedy completions equal those of ``--moe-a2a-backend torch``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from epserve.gateway.client import generate
from epserve_up import epserve_up

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "The colour of the sea is", "1, 2, 3,"]


def serve(tiny_model: Path, logs: Path, backend: str) -> list[str]:
    """Start a deployment with ``backend``, run every prompt twice at once (both attention workers
    serve some), stop it; → the completions in prompt order."""
    args = ["--model-path", str(tiny_model), "--moe-a2a-backend", backend, "--attention-workers", "2",
            "--expert-workers", "2", "--dtype", "float64"]
    with epserve_up(args, logs) as endpoints, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: generate(endpoints["gateway"], p, max_new_tokens=16, temperature=0.0,
                                                   timeout_s=180), PROMPTS * 2))
    texts = [r.text for r in results]
    assert texts[:len(PROMPTS)] == texts[len(PROMPTS):]
    return texts[:len(PROMPTS)]


def test_up_cuda_ipc_serves_what_torch_serves(tiny_model, tmp_path) -> None:
    over_torch = serve(tiny_model, tmp_path / "torch", "torch")
    over_ipc = serve(tiny_model, tmp_path / "cuda_ipc", "cuda_ipc")
    assert all(over_torch) and over_ipc == over_torch
    joined = [p for p in (tmp_path / "cuda_ipc").glob("attention-*.log") if "cuda_ipc data plane" in p.read_text()]
    assert len(joined) == 2
