"""DeepSeek-V3/V2 on the batched GPU runner (skipped without CUDA): multi-head latent attention through the
Triton MLA backend (attention_mla_triton.py), parity with transformers as the Qwen3 GPU tests check it, and
CUDA-graph replay against eager."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.colocated import generate_tokens
from epserve.sampling import SamplingParams
from test_gpu_engine import PROMPTS, gpu_engine, prompt_logits

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
    model = transformers.AutoModelForCausalLM.from_pretrained(deepseek_model, dtype=torch.float32,
                                                              experts_implementation="eager").cuda().eval()
    return model, transformers.AutoTokenizer.from_pretrained(deepseek_model)


def test_the_runner_uses_the_mla_kernels_and_graphs(deepseek_model):
    engine = gpu_engine(deepseek_model, torch.bfloat16)
    assert type(engine.runner.attention).__name__ == "TritonMlaAttention"
    assert engine.runner.graphs is not None and engine.runner.graphs.captured
    assert engine.kv_cache.kv[0].device.type == "cuda"


def test_float32_ragged_logits_match_transformers(deepseek_model, hf):
    model, tok = hf
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = prompt_logits(gpu_engine(deepseek_model, torch.float32), ids)
    for prompt_ids, got in zip(ids, ours):
        with torch.no_grad():
            want = model(torch.tensor([prompt_ids], device="cuda")).logits[0].float()
        rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert rel <= 1e-4, f"relative error {rel:.3e}"


def test_float32_greedy_matches_transformers(deepseek_model, hf):
    """Prefill (MLA prefill kernel) then decode steps (MLA decode kernel), eager: float32 experts run
    the torch MoE runner, which syncs with the host and so is not captured (bf16 graphs: below)."""
    model, tok = hf
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine = gpu_engine(deepseek_model, torch.float32)
    assert engine.runner.graphs is None
    ours = generate_tokens(engine, ids, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    for prompt_ids, got in zip(ids, ours):
        want = model.generate(torch.tensor([prompt_ids], device="cuda"), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert got == want


def test_cuda_graph_replay_equals_eager(deepseek_model):
    """4 sequences (a bucket size, so the eager step and the graph pick the same kernels)."""
    prompts = [[5, 17, 300, 42, 7], [9] * 23, [1, 2, 3], list(range(40, 77))]
    greedy = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    graphed = gpu_engine(deepseek_model, torch.bfloat16)
    eager = gpu_engine(deepseek_model, torch.bfloat16, disable_cuda_graph=True)
    assert eager.runner.graphs is None
    assert generate_tokens(graphed, prompts, greedy) == generate_tokens(eager, prompts, greedy)
    for i, ids in enumerate(prompts):
        graphed.add_request(str(i), ids, SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    graphed.step()                                                      # prefill
    graphed._apply_inbox()
    chunks = graphed.scheduler.schedule()
    assert all(c.num_tokens == 1 for c in chunks) and len(chunks) == 4
    runner = graphed.runner
    runner._apply_block_table_updates(runner._block_table_updates(chunks))
    replayed = runner.graphs.replay(chunks, graphed.expert_map).clone()
    eager_logits = runner.forward(runner.eager_batch(chunks, decode=True), graphed.expert_map)
    assert torch.equal(replayed, eager_logits)
