"""DeepSeek-V3/V2 on the batched GPU runner (skipped without CUDA): multi-head latent attention through the
Triton MLA backend (attention_mla_triton.py), parity with transformers as the Qwen3 GPU tests check it, and
CUDA-graph replay against eager."""

from __future__ import annotations

import pytest
import torch

from test_gpu_engine import (assert_graph_replay_equals_eager, assert_greedy_matches, assert_prompt_logits_match,
                             gpu_engine, transformers_reference)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
transformers = pytest.importorskip("transformers")

# as test_deepseek_parity.py: 3 layers (the first dense), 16 experts in 4 groups, top-4, shared experts
OPTIONS = dict(num_layers=3, num_experts=16, top_k=4, hidden_size=64, moe_intermediate_size=32,
               num_attention_heads=4, head_dim=16)


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def deepseek_model(tiny_model_factory, request):
    return tiny_model_factory(seed=0, arch=request.param, **OPTIONS)


@pytest.fixture(scope="module")
def hf(deepseek_model):
    return transformers_reference(deepseek_model)


def test_the_runner_uses_the_mla_kernels_and_graphs(deepseek_model):
    engine = gpu_engine(deepseek_model, torch.bfloat16)
    assert type(engine.runner.attention).__name__ == "TritonMlaAttention"
    assert engine.runner.graphs is not None and engine.runner.graphs.captured
    assert engine.kv_cache.kv[0].device.type == "cuda"


def test_float32_ragged_logits_match_transformers(deepseek_model, hf):
    assert_prompt_logits_match(gpu_engine(deepseek_model, torch.float32), hf)


def test_float32_greedy_matches_transformers(deepseek_model, hf):
    """Prefill (MLA prefill kernel) then decode steps (MLA decode kernel), eager: float32 experts run
    the torch MoE runner, which syncs with the host and so is not captured (bf16 graphs: below)."""
    engine = gpu_engine(deepseek_model, torch.float32)
    assert engine.runner.graphs is None
    assert_greedy_matches(engine, hf)


def test_cuda_graph_replay_equals_eager(deepseek_model):
    assert_graph_replay_equals_eager(deepseek_model)
