"""Mixtral (no q/k norm; a sliding window shorter than the prompts) and GLM-4-MoE (partial rotary, q/k/v
biases) on the batched GPU runner (skipped without CUDA): compiled, against transformers as the Qwen3 and
DeepSeek GPU tests check it. Under the Triton interpreter they equal the host runner
(test_gqa_moe_parity.py); these check what only the compiled kernels can get wrong (GPT-OSS showed that
such a gap exists: test_gpu_gpt_oss.py)."""

from __future__ import annotations

import pytest
import torch

from family_parity import OPTIONS, with_config
from test_gpu_engine import (assert_graph_replay_equals_eager, assert_greedy_matches, assert_prompt_logits_match,
                             gpu_engine, transformers_reference)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["mixtral_window_6", "glm4_moe"])
def family_model(tiny_model_factory, tmp_path_factory, request):
    if request.param == "glm4_moe":
        return tiny_model_factory(seed=0, arch="glm4_moe", **OPTIONS)
    plain = tiny_model_factory(seed=0, arch="mixtral", **OPTIONS)
    return with_config(plain, tmp_path_factory.mktemp("windowed"), "windowed", sliding_window=6)


@pytest.fixture(scope="module")
def hf(family_model):
    return transformers_reference(family_model)


def test_float32_ragged_logits_match_transformers(family_model, hf):
    assert_prompt_logits_match(gpu_engine(family_model, torch.float32), hf)


@pytest.mark.parametrize("budget", [512, 8])
def test_float32_greedy_matches_transformers(family_model, hf, budget):
    """Prefill whole or in chunks of 8 tokens, then 16 decode steps (past the window for Mixtral)."""
    assert_greedy_matches(gpu_engine(family_model, torch.float32, max_num_batched_tokens=budget), hf)


def test_bf16_graph_replay_equals_eager(family_model):
    assert_graph_replay_equals_eager(family_model)
