"""End-to-end fixtures: real deployments of real processes on free ports."""

from __future__ import annotations

import pytest
import torch

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def reference_greedy(tiny_model):
    """prompt → transformers' greedy completion text (float64), cached."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64,
                                                              experts_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    cache: dict[tuple[str, int], str] = {}

    def greedy(prompt: str, max_new_tokens: int) -> str:
        key = (prompt, max_new_tokens)
        if key not in cache:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
            cache[key] = tok.decode(out, skip_special_tokens=True)
        return cache[key]

    return greedy


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    """2 attention workers, 2 expert workers, 2 redundant experts, float64, torch (gloo) data plane."""
    config = DeploymentConfig(model_path=str(tiny_model), num_attention_workers=2, num_expert_workers=2,
                              num_redundant_experts=2, dtype="float64",
                              log_dir=str(tmp_path_factory.mktemp("logs")))
    with LocalDeployment(config) as running:
        yield running
