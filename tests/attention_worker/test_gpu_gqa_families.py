"""Mixtral (no q/k norm; a sliding window shorter than the prompts) and GLM-4-MoE (partial rotary, q/k/v
biases) on the batched GPU runner (skipped without CUDA): compiled, against transformers as the Qwen3 and
DeepSeek GPU tests check it. Under the Triton interpreter they equal the host runner
(test_gqa_moe_parity.py); these check what only the compiled kernels can get wrong (GPT-OSS showed that
such a gap exists: test_gpu_gpt_oss.py)."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.colocated import generate_tokens
from epserve.sampling import SamplingParams
from family_parity import OPTIONS, with_config
from test_gpu_engine import PROMPTS, gpu_engine, prompt_logits

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
    model = transformers.AutoModelForCausalLM.from_pretrained(family_model, dtype=torch.float32,
                                                              experts_implementation="eager").cuda().eval()
    return model, transformers.AutoTokenizer.from_pretrained(family_model)


def test_float32_ragged_logits_match_transformers(family_model, hf):
    model, tok = hf
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = prompt_logits(gpu_engine(family_model, torch.float32), ids)
    for prompt_ids, got in zip(ids, ours):
        with torch.no_grad():
            want = model(torch.tensor([prompt_ids], device="cuda")).logits[0].float()
        rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert rel <= 1e-4, f"relative error {rel:.3e}"


@pytest.mark.parametrize("budget", [512, 8])
def test_float32_greedy_matches_transformers(family_model, hf, budget):
    """Prefill whole or in chunks of 8 tokens, then 16 decode steps (past the window for Mixtral)."""
    model, tok = hf
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine = gpu_engine(family_model, torch.float32, max_num_batched_tokens=budget)
    ours = generate_tokens(engine, ids, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    for prompt_ids, got in zip(ids, ours):
        want = model.generate(torch.tensor([prompt_ids], device="cuda"), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert got == want


def test_bf16_graph_replay_equals_eager(family_model):
    prompts = [[5, 17, 300, 42, 7], [9] * 23, [1, 2, 3], list(range(40, 77))]
    greedy = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    graphed = gpu_engine(family_model, torch.bfloat16)
    eager = gpu_engine(family_model, torch.bfloat16, disable_cuda_graph=True)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.captured and eager.runner.graphs is None
    assert generate_tokens(graphed, prompts, greedy) == generate_tokens(eager, prompts, greedy)
