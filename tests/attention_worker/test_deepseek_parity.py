"""DeepSeek-V3 (multi-head latent attention, YaRN, sigmoid grouped routing with a correction bias,
shared experts, a dense first layer) and DeepSeek-V2 (V2-Lite's attention without q_lora_rank, complex
rotary, softmax group-limited greedy routing): parity of our attention side + experts with transformers."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.attention_mla import TorchMlaAttention
from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.engine import EngineLimits
from epserve.attention_worker.expert_routing import DispatchAlgorithm, ExpertRouter
from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.attention_worker.mla_kv_cache import MlaKVCache
from epserve.attention_worker.moe_executor import InProcessExperts, run_micro_batches
from epserve.sampling import SamplingParams
from epserve.expert_map import ExpertMap
from epserve.model_config import load_model_spec
from epserve.models.deepseek_v3 import load_attention_side, route_sigmoid_grouped, route_softmax_limited
from epserve.models.expert_side import load_expert_slots
from epserve.models.decoder import ForwardBatch
from epserve.models.rope_scaling import MlaRotaryEmbedding, mla_softmax_scale
from epserve.moe_runner import make_moe_runner
from epserve.weights import CheckpointReader

transformers = pytest.importorskip("transformers")

PROMPTS = ["Hello world, this is a test of the engine.", "The quick brown fox", "café naïve 東京 🙂 ok",
           "def f(x):\n    return x * 2"]
# 3 layers (the first dense), 16 experts in 4 groups of which 2 are kept, top-4, shared experts
OPTIONS = dict(num_layers=3, num_experts=16, top_k=4, hidden_size=64, moe_intermediate_size=32,
               num_attention_heads=4, head_dim=16)
ARCHS = ["deepseek_v3", "deepseek_v2"]


@pytest.fixture(scope="module", params=ARCHS)
def deepseek_model(tiny_model_factory, request):
    return tiny_model_factory(seed=0, arch=request.param, **OPTIONS)


@pytest.fixture(scope="module")
def deepseek_v3_model(tiny_model_factory):
    return tiny_model_factory(seed=0, arch="deepseek_v3", **OPTIONS)


def reference(model_dir, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, experts_implementation="eager")
    return model.eval(), transformers.AutoTokenizer.from_pretrained(model_dir)


def ragged_logits(model_dir, prompts_ids, dtype, num_micro_batches=1, absorbed_max_new_tokens=1):
    """All-position logits of a ragged batch (one prefill per prompt) through our attention side and
    in-process experts; ``absorbed_max_new_tokens`` picks the attention form."""
    spec = load_model_spec(model_dir)
    reader = CheckpointReader(model_dir, show_progress=False)
    model = load_attention_side(spec, reader, dtype)
    expert_map = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts, 0, ("local",))
    executor = InProcessExperts(load_expert_slots(spec, reader, expert_map.phy2log, dtype),
                                make_moe_runner("torch"), ExpertRouter(DispatchAlgorithm.STATIC, 0))
    cache = MlaKVCache(spec.num_hidden_layers, 64, 4, spec.mla.kv_lora_rank, spec.mla.qk_rope_head_dim, dtype)
    attention = TorchMlaAttention(cache, spec, absorbed_max_new_tokens)
    groups = [prompts_ids[i::num_micro_batches] for i in range(num_micro_batches)]
    generators, next_block = [], 0
    for group in groups:
        tables, slots = [], []
        for ids in group:
            blocks = list(range(next_block, next_block + -(-len(ids) // 4)))
            next_block += len(blocks)
            tables.append(blocks)
            slots += [blocks[p // 4] * 4 + p % 4 for p in range(len(ids))]
        batch = ForwardBatch(torch.tensor([t for ids in group for t in ids]),
                             torch.tensor([p for ids in group for p in range(len(ids))]),
                             [len(ids) for ids in group], [len(ids) for ids in group], tables, torch.tensor(slots))
        generators.append(model.forward_steps(batch, attention))
    outs = run_micro_batches(generators, executor, expert_map)
    per_prompt = {}
    for group_index, (group, logits) in enumerate(zip(groups, outs)):
        start = 0
        for j, ids in enumerate(group):
            per_prompt[j * num_micro_batches + group_index] = logits[start:start + len(ids)]
            start += len(ids)
    return [per_prompt[i] for i in range(len(prompts_ids))]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def float64_tolerance(model_dir) -> float:
    """DeepSeek-V2's reference rotates in float32 whatever the dtype: a float64 input that differs in
    its last bits (our fused q/kv GEMM) can round to another float32, ~1e-8 relative in the logits."""
    return 1e-6 if load_model_spec(model_dir).mla.rope_style == "complex" else 1e-9


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("num_micro_batches", [1, 2])
def test_ragged_batch_logits_match_transformers(deepseek_model, dtype, tolerance, num_micro_batches):
    ref, tok = reference(deepseek_model, dtype)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = ragged_logits(deepseek_model, ids, dtype, num_micro_batches)
    if dtype == torch.float64:
        tolerance = float64_tolerance(deepseek_model)
    for prompt_ids, got in zip(ids, ours):
        with torch.no_grad():
            want = ref(torch.tensor([prompt_ids])).logits[0].float()
        assert relative_error(got, want) <= tolerance


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_absorbed_attention_matches_expanded_and_transformers(deepseek_model, dtype, tolerance):
    """The absorbed form (kv_b_proj folded into query and output) over whole prompts, not only decode."""
    ref, tok = reference(deepseek_model, dtype)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    absorbed = ragged_logits(deepseek_model, ids, dtype, absorbed_max_new_tokens=10**9)
    expanded = ragged_logits(deepseek_model, ids, dtype, absorbed_max_new_tokens=0)
    if dtype == torch.float64:
        tolerance = float64_tolerance(deepseek_model)
    for prompt_ids, got, other in zip(ids, absorbed, expanded):
        with torch.no_grad():
            want = ref(torch.tensor([prompt_ids])).logits[0].float()
        assert relative_error(got, want) <= tolerance
        assert relative_error(got, other) <= tolerance


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_continuations_identical(tiny_model_factory, arch, seed):
    """Prefill (expanded attention) then 24 decode steps (absorbed attention) through the colocated engine."""
    model_dir = tiny_model_factory(seed=seed, arch=arch, **OPTIONS)
    ref, tok = reference(model_dir, torch.float64)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine = build_colocated_engine(str(model_dir), torch.float64)
    ours = generate_tokens(engine, ids, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
    for prompt_ids, got in zip(ids, ours):
        want = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert got == want


def test_chunked_prefill_matches_one_shot(deepseek_model):
    """A prompt longer than the token budget is prefilled in chunks over its cached latents."""
    ref, tok = reference(deepseek_model, torch.float64)
    prompt = tok(" ".join(PROMPTS))["input_ids"]
    limits = EngineLimits(max_num_batched_tokens=8, num_kv_blocks=64, kv_block_size=4)
    engine = build_colocated_engine(str(deepseek_model), torch.float64, limits=limits)
    got = generate_tokens(engine, [prompt], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))[0]
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(prompt):].tolist()
    assert got == want


def test_latent_cache_holds_kv_lora_rank_plus_rope_values_per_token_and_layer(deepseek_v3_model, tiny_model):
    engine = build_colocated_engine(str(deepseek_v3_model), torch.float64)
    spec, cache, limits = engine.model.spec, engine.kv_cache, engine.limits
    assert isinstance(cache, MlaKVCache)
    token_layers = limits.num_kv_blocks * limits.kv_block_size * spec.num_hidden_layers
    per_token_layer = sum(t.numel() for t in cache.tensors()) / token_layers
    assert per_token_layer == spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim
    # what a GQA cache of the same heads would hold: keys and values of every head
    assert per_token_layer < 2 * spec.num_attention_heads * spec.mla.qk_head_dim
    # the Qwen3 engine still gets the GQA layout
    qwen = build_colocated_engine(str(tiny_model), torch.float64)
    assert isinstance(qwen.kv_cache, PagedKVCache)
    # and what was written is the latent: one prefill fills exactly its tokens' rows
    prompt = [5, 17, 300, 42, 7, 9]
    generate_tokens(engine, [prompt], SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
    written = (cache.kv[0].abs().sum(-1) != 0).sum().item()
    assert written == len(prompt)


def test_router_matches_transformers(deepseek_model):
    spec = load_model_spec(deepseek_model)
    ref, _ = reference(deepseek_model, torch.float64)
    gate = ref.model.layers[spec.moe_layers[0]].mlp.gate
    hidden = torch.randn(37, spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if spec.routing.topk_method == "noaux_tc":
        ids, weights = route_sigmoid_grouped(spec, hidden, gate.weight.detach(), gate.e_score_correction_bias)
    else:
        ids, weights = route_softmax_limited(spec, hidden, gate.weight.detach())
    with torch.no_grad():
        _, want_weights, want_ids = gate(hidden)
    order, want_order = ids.sort(-1), want_ids.sort(-1)
    assert torch.equal(order.values, want_order.values)
    assert torch.equal(weights.gather(1, order.indices), want_weights.gather(1, want_order.indices))
    # the groups limit choices: every token's experts lie in at most topk_group groups
    per_group = spec.num_experts // spec.routing.n_group
    assert max(len(set((row // per_group).tolist())) for row in ids) <= spec.routing.topk_group


def test_v2_greedy_router_matches_transformers(tiny_model_factory):
    """V2-Lite's plain greedy top-k (the tiny V2 model routes group-limited)."""
    import dataclasses

    model_dir = tiny_model_factory(seed=0, arch="deepseek_v2", **OPTIONS)
    spec = load_model_spec(model_dir)
    spec = dataclasses.replace(spec, routing=dataclasses.replace(spec.routing, topk_method="greedy"))
    config = transformers.AutoConfig.from_pretrained(model_dir, topk_method="greedy")
    gate = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter(config)
    torch.nn.init.normal_(gate.weight, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(29, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    ids, weights = route_softmax_limited(spec, hidden, gate.weight.detach())
    with torch.no_grad():
        _, want_weights, want_ids = gate(hidden)
    order, want_order = ids.sort(-1), want_ids.sort(-1)
    assert torch.equal(order.values, want_order.values)
    assert torch.equal(weights.gather(1, order.indices), want_weights.gather(1, want_order.indices))


def test_yarn_rotary_matches_transformers(deepseek_v3_model):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    deepseek_model = deepseek_v3_model
    spec = load_model_spec(deepseek_model)
    config = transformers.AutoConfig.from_pretrained(deepseek_model)
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    rope = MlaRotaryEmbedding(spec.mla.qk_rope_head_dim, spec.rope_theta, spec.rope_scaling, "interleave")
    assert torch.equal(rope.inv_freq, want_inv_freq) and rope.attention_factor == want_factor != 1.0
    scale = mla_softmax_scale(spec.mla.qk_head_dim, spec.rope_scaling)
    plain = spec.mla.qk_head_dim ** -0.5
    assert scale == yarn_apply_mscale(config.rope_parameters, plain) != plain


def test_rotate_half_layout_matches_transformers(deepseek_v3_model, tmp_path):
    """A V3 checkpoint with rope_interleave false rotates halves, in both implementations."""
    import json
    import shutil

    model_dir = tmp_path / "halves"
    shutil.copytree(deepseek_v3_model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "rope_interleave": False}))
    assert load_model_spec(model_dir).mla.rope_style == "rotate_half"
    ref, tok = reference(model_dir, torch.float64)
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    for prompt_ids, got in zip(ids, ragged_logits(model_dir, ids, torch.float64)):
        with torch.no_grad():
            want = ref(torch.tensor([prompt_ids])).logits[0].float()
        assert relative_error(got, want) <= 1e-9
