"""GPT-OSS (attention sinks, sliding-window and full layers alternating, YaRN, q/k/v/o biases, a biased router
softmaxed after the top-k, biased experts with a clamped SwiGLU): parity of our attention side + experts with
transformers."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.colocated import build_colocated_engine
from epserve.attention_worker.engine import EngineLimits
from epserve.model_config import load_model_spec
from epserve.models.expert_side import load_expert_slots
from epserve.models.gpt_oss import route_topk_softmax
from epserve.models.rope_scaling import MlaRotaryEmbedding
from epserve.weights import CheckpointReader
from family_parity import (FLOAT64_TOLERANCE, OPTIONS, PROMPTS, assert_greedy_matches, assert_logits_match, reference,
                           with_config)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt_oss_model(tiny_model_factory):
    return tiny_model_factory(seed=0, arch="gpt_oss", **OPTIONS)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, FLOAT64_TOLERANCE), (torch.float32, 1e-4)])
@pytest.mark.parametrize("num_micro_batches", [1, 2])
def test_ragged_batch_logits_match_transformers(gpt_oss_model, dtype, tolerance, num_micro_batches):
    """Prompts of 12 to 29 tokens: the 8-position window of the even layers cuts every one of them."""
    assert_logits_match(gpt_oss_model, dtype, tolerance, num_micro_batches)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_continuations_identical(tiny_model_factory, seed):
    assert_greedy_matches(tiny_model_factory(seed=seed, arch="gpt_oss", **OPTIONS))


def test_chunked_prefill_matches_one_shot(gpt_oss_model):
    limits = EngineLimits(max_num_batched_tokens=8, num_kv_blocks=64, kv_block_size=4)
    assert_greedy_matches(gpt_oss_model, max_new_tokens=8, limits=limits, prompts=[" ".join(PROMPTS)])


def test_layer_types_are_followed(gpt_oss_model, tmp_path):
    """Every layer full (no window), and every layer windowed: both still equal transformers, and differ."""
    full = with_config(gpt_oss_model, tmp_path, "full", layer_types=["full_attention"] * 3)
    windowed = with_config(gpt_oss_model, tmp_path, "windowed", layer_types=["sliding_attention"] * 3)
    assert load_model_spec(full).full_attention_layers == (0, 1, 2)
    assert load_model_spec(windowed).full_attention_layers == ()
    for variant in (full, windowed):
        assert_logits_match(variant, torch.float64, FLOAT64_TOLERANCE, prompts=PROMPTS[:2])
    ref_full, tok = reference(full, torch.float64)
    ref_windowed, _ = reference(windowed, torch.float64)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(ref_full(ids).logits, ref_windowed(ids).logits, rtol=1e-3)


def test_router_matches_transformers(gpt_oss_model):
    spec = load_model_spec(gpt_oss_model)
    ref, _ = reference(gpt_oss_model, torch.float64)
    router = ref.model.layers[1].mlp.router
    hidden = torch.randn(37, spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids, weights = route_topk_softmax(spec.num_experts_per_tok, hidden, router.weight.detach(), router.bias.detach())
    with torch.no_grad():
        _, want_weights, want_ids = router(hidden)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)


def test_yarn_rotary_matches_transformers(gpt_oss_model):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    spec = load_model_spec(gpt_oss_model)
    assert spec.rope_scaling.factor == 4.0 and spec.rope_scaling.truncate is False
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.AutoConfig.from_pretrained(gpt_oss_model))
    rope = MlaRotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling, "rotate_half")
    assert torch.equal(rope.inv_freq, want_inv_freq) and rope.attention_factor == want_factor != 1.0


def test_expert_slots_copy_their_biases(gpt_oss_model):
    """Replicas and experts copied from a held version carry the biases read from the fused checkpoint."""
    spec = load_model_spec(gpt_oss_model)
    reader = CheckpointReader(gpt_oss_model, show_progress=False)
    held = load_expert_slots(spec, reader, torch.tensor([[1, 5, 3]] * 3), torch.float64)
    slots = load_expert_slots(spec, reader, torch.tensor([[5, 5, -1, 2]] * 3), torch.float64, held=[held])
    fresh = load_expert_slots(spec, CheckpointReader(gpt_oss_model, show_progress=False),
                              torch.tensor([[5, 5, -1, 2]] * 3), torch.float64)
    for layer in range(3):
        for got, want in zip(slots.layer_tensors(layer), fresh.layer_tensors(layer)):
            assert torch.equal(got, want)
    ref, _ = reference(gpt_oss_model, torch.float64)
    experts = ref.model.layers[2].mlp.experts
    w13, w2, b13, b2 = slots.layer_tensors(2)
    assert torch.equal(w13[0, :32], experts.gate_up_proj[5, :, 0::2].T)
    assert torch.equal(b2[0], experts.down_proj_bias[5])
    assert torch.equal(b13[3, 32:], experts.gate_up_proj_bias[2, 1::2]) and not b13[2].any()
    assert torch.equal(w2[3], experts.down_proj[2].T)


def test_gpu_paths_refuse_what_they_do_not_compute(gpt_oss_model):
    """The attention runs on the batched GPU runner (test_gpt_oss_triton.py); the experts on the torch runner only."""
    with pytest.raises(ValueError, match="clamped SwiGLU.*--moe-runner-backend torch only; the triton runner"):
        build_colocated_engine(str(gpt_oss_model), torch.float32, moe_runner_backend="triton")
