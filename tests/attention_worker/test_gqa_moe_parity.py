"""Mixtral (GQA without q/k norms, renormalised softmax top-k, optional sliding window) and GLM-4-MoE
(q/k/v biases, q/k norms, partial rotary, DeepSeek-V3's grouped routing with a correction bias, a shared
expert, a dense first layer): parity of our attention side + experts with transformers."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.engine import EngineLimits
from epserve.sampling import SamplingParams
from epserve.model_config import load_model_spec
from epserve.models.deepseek_v3 import route_sigmoid_grouped
from family_parity import (FLOAT64_TOLERANCE, OPTIONS, PROMPTS, assert_greedy_matches, assert_logits_match,
                           ragged_logits, reference, relative_error, with_config)

transformers = pytest.importorskip("transformers")

ARCHS = ["mixtral", "glm4_moe"]


@pytest.fixture(scope="module", params=ARCHS)
def gqa_model(tiny_model_factory, request):
    return tiny_model_factory(seed=0, arch=request.param, **OPTIONS)


@pytest.fixture(scope="module")
def mixtral_model(tiny_model_factory):
    return tiny_model_factory(seed=0, arch="mixtral", **OPTIONS)


@pytest.fixture(scope="module")
def glm_model(tiny_model_factory):
    return tiny_model_factory(seed=0, arch="glm4_moe", **OPTIONS)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, FLOAT64_TOLERANCE), (torch.float32, 1e-4)])
@pytest.mark.parametrize("num_micro_batches", [1, 2])
def test_ragged_batch_logits_match_transformers(gqa_model, dtype, tolerance, num_micro_batches):
    assert_logits_match(gqa_model, dtype, tolerance, num_micro_batches)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_continuations_identical(tiny_model_factory, arch, seed):
    """Prefill then 24 decode steps through the colocated engine, float64."""
    assert_greedy_matches(tiny_model_factory(seed=seed, arch=arch, **OPTIONS))


def test_chunked_prefill_matches_one_shot(gqa_model):
    """A prompt longer than the token budget is prefilled in chunks over its cached keys and values."""
    prompt = [" ".join(PROMPTS)]
    limits = EngineLimits(max_num_batched_tokens=8, num_kv_blocks=64, kv_block_size=4)
    assert_greedy_matches(gqa_model, max_new_tokens=8, limits=limits, prompts=prompt)


def test_mixtral_sliding_window_matches_transformers(mixtral_model, tmp_path):
    """A window of 6 positions, shorter than every prompt: prefill (ragged, chunked) and decode past it."""
    windowed = with_config(mixtral_model, tmp_path, "windowed", sliding_window=6)
    assert load_model_spec(windowed).sliding_window == 6
    assert_logits_match(windowed, torch.float64, FLOAT64_TOLERANCE)
    assert_logits_match(windowed, torch.float32, 1e-4, num_micro_batches=2)
    assert_greedy_matches(windowed, max_new_tokens=12)
    limits = EngineLimits(max_num_batched_tokens=8, num_kv_blocks=64, kv_block_size=4)
    assert_greedy_matches(windowed, max_new_tokens=8, limits=limits, prompts=[" ".join(PROMPTS)])
    # the window changes the output: the test above is not vacuous
    ref, tok = reference(mixtral_model, torch.float64)
    plain = ragged_logits(mixtral_model, [tok(PROMPTS[0])["input_ids"]], torch.float64)[0]
    assert relative_error(ragged_logits(windowed, [tok(PROMPTS[0])["input_ids"]], torch.float64)[0], plain) > 1e-3


@pytest.mark.parametrize("changes", [dict(use_qk_norm=False), dict(partial_rotary_factor=1.0),
                                     dict(partial_rotary_factor=0.25, attention_bias=False, n_group=1, topk_group=1)])
def test_glm_variants_match_transformers(glm_model, tmp_path, changes):
    """GLM-4.5-Air has no q/k norms; other rotary shares; no q/k/v biases and one expert group (GLM-4.5's)."""
    variant = with_config(glm_model, tmp_path, "variant", **changes)
    if changes.get("attention_bias") is False:            # the checkpoint then has no biases
        from safetensors.torch import load_file, save_file
        tensors = {n: t for n, t in load_file(variant / "model.safetensors").items() if not n.endswith("_proj.bias")}
        save_file(tensors, str(variant / "model.safetensors"), metadata={"format": "pt"})
    spec = load_model_spec(variant)
    assert spec.rotary_dim == int(16 * changes.get("partial_rotary_factor", 0.5))
    assert_logits_match(variant, torch.float64, FLOAT64_TOLERANCE, prompts=PROMPTS[:2])


def test_glm_router_matches_transformers(glm_model):
    spec = load_model_spec(glm_model)
    ref, _ = reference(glm_model, torch.float64)
    gate = ref.model.layers[spec.moe_layers[0]].mlp.gate
    hidden = torch.randn(37, spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids, weights = route_sigmoid_grouped(spec, hidden, gate.weight.detach(), gate.e_score_correction_bias)
    with torch.no_grad():
        _, want_weights, want_ids = gate(hidden)
    order, want_order = ids.sort(-1), want_ids.sort(-1)
    assert torch.equal(order.values, want_order.values)
    assert torch.equal(weights.gather(1, order.indices), want_weights.gather(1, want_order.indices))


@pytest.mark.parametrize("family", ["mixtral", "glm"])
def test_the_batched_gpu_runner_equals_the_host_runner(family, mixtral_model, glm_model):
    """The Triton runner (here interpreted, float32) serves Mixtral's plain GQA attention and GLM-4-MoE's
    (partial rotary: RoPE on half of each head, q/k norms, q/k/v biases; a shared expert, a dense layer)."""
    model = mixtral_model if family == "mixtral" else glm_model
    host, batched = host_and_batched_engines(model, max_num_batched_tokens=48)
    assert type(batched.runner).__name__ == "GpuStepRunner"
    assert generate_tokens(batched, RUNNER_PROMPTS, RUNNER_GREEDY) == generate_tokens(host, RUNNER_PROMPTS,
                                                                                      RUNNER_GREEDY)


RUNNER_PROMPTS = [[5, 17, 300, 42, 7], [9] * 23, [1, 2, 3]]
RUNNER_GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)


def host_and_batched_engines(model, max_num_batched_tokens: int):
    """The same model on the host runner and on the Triton runner (interpreted here), float32."""
    options = dict(num_kv_blocks=64, kv_block_size=4, max_num_batched_tokens=max_num_batched_tokens,
                   max_num_seqs=8)
    return tuple(build_colocated_engine(str(model), torch.float32,
                                        limits=EngineLimits(attention_backend=backend, **options))
                 for backend in ("torch_native", "triton"))


def test_the_batched_gpu_runner_equals_the_host_runner_within_a_sliding_window(mixtral_model, tmp_path):
    """Mixtral with a 6-position window on the Triton runner (interpreted, float32): prompts longer than
    the window, prefilled in chunks of at most 10 tokens, then decode steps past it."""
    windowed = with_config(mixtral_model, tmp_path, "windowed", sliding_window=6)
    host, batched = host_and_batched_engines(windowed, max_num_batched_tokens=10)
    assert batched.runner.attention.windows == [6] * load_model_spec(windowed).num_hidden_layers
    assert generate_tokens(batched, RUNNER_PROMPTS, RUNNER_GREEDY) == generate_tokens(host, RUNNER_PROMPTS,
                                                                                      RUNNER_GREEDY)
