"""DeepSeek-V3 config.json parsing: the published shape, transformers' defaults, errors that name the field,
and the tiny-model architecture that writes a checkpoint transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from epserve.model_config import ModelConfigError, load_model_spec
from epserve.models.deepseek_v3 import checkpoint_shapes
from epserve.models.rope_scaling import MlaRotaryEmbedding, mla_softmax_scale

transformers = pytest.importorskip("transformers")

# DeepSeek-V3's published config.json (the keys epserve and transformers read; no quantization_config)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
}


def write(tmp_path, **changes):
    config = {**DEEPSEEK_V3, **changes}
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_published_deepseek_v3_config(tmp_path):
    spec = load_model_spec(write(tmp_path))
    assert spec.model_type == "deepseek_v3" and spec.num_experts == 256 and spec.num_experts_per_tok == 8
    assert spec.moe_layers == tuple(range(3, 61)) and spec.num_moe_layers == 58
    assert (spec.mla.q_lora_rank, spec.mla.kv_lora_rank, spec.mla.qk_nope_head_dim, spec.mla.qk_rope_head_dim,
            spec.mla.v_head_dim, spec.mla.rope_style) == (1536, 512, 128, 64, 128, "interleave")
    assert spec.mla.cache_width == 576 and spec.num_key_value_heads == 128 and spec.head_dim == 64
    assert (spec.routing.scoring_func, spec.routing.topk_method, spec.routing.n_group, spec.routing.topk_group,
            spec.routing.routed_scaling_factor) == ("sigmoid", "noaux_tc", 8, 4, 2.5)
    assert spec.n_shared_experts == 1 and spec.norm_topk_prob
    assert spec.rope_scaling.factor == 40 and spec.rope_scaling.original_max_position_embeddings == 4096
    # YaRN exactly as transformers computes it for this config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale
    config = transformers.DeepseekV3Config.from_pretrained(tmp_path)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    rope = MlaRotaryEmbedding(64, spec.rope_theta, spec.rope_scaling, "interleave")
    assert torch.equal(rope.inv_freq, inv_freq) and rope.attention_factor == factor
    assert mla_softmax_scale(192, spec.rope_scaling) == yarn_apply_mscale(config.rope_parameters, 192 ** -0.5)


def test_checkpoint_names_match_transformers(tmp_path):
    """Our one description of the checkpoint's tensors equals the parameters transformers creates."""
    small = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2,
                 num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
                 qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, vocab_size=300)
    spec = load_model_spec(write(tmp_path, **small))
    config = transformers.DeepseekV3Config.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    theirs = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]
              if "rotary_emb" not in name}
    ours = checkpoint_shapes(spec)
    routed = {n: s for n, s in ours.items() if ".mlp.experts." in n}
    assert {n: s for n, s in ours.items() if n not in routed} == {n: s for n, s in theirs.items()
                                                                  if ".mlp.experts." not in n}
    # transformers fuses the per-expert tensors it loads: [E, 2I, D] and [E, D, I]
    assert theirs["model.layers.1.mlp.experts.gate_up_proj"] == (8, 32, 64)
    assert len(routed) == 3 * 8 * spec.num_moe_layers


def test_missing_keys_take_transformers_defaults(tmp_path):
    spec = load_model_spec(write(tmp_path, n_group=None, topk_group=None, n_shared_experts=None,
                                 routed_scaling_factor=None, first_k_dense_replace=None, rope_scaling=None))
    assert (spec.routing.n_group, spec.routing.topk_group, spec.n_shared_experts) == (8, 4, 1)
    assert spec.routing.routed_scaling_factor == 2.5 and spec.moe_layers[0] == 3 and spec.rope_scaling is None


@pytest.mark.parametrize("changes,message", [
    (dict(n_group=7), "n_group \\(7\\) must divide n_routed_experts"),
    (dict(topk_group=9), "topk_group \\(9\\) must be in \\[1, n_group=8\\]"),
    (dict(num_experts_per_tok=70, topk_group=2), "exceeds the 64 experts"),
    (dict(n_group=256, topk_group=1), "needs at least 2 experts"),
    (dict(scoring_func="softmax"), "scoring_func 'sigmoid'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling 'linear' is not supported"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim \\(63\\) must be even"),
    (dict(kv_lora_rank=None, architectures=["DeepseekV3ForCausalLM"]), None),
    (dict(quantization_config={"quant_method": "fp8"}), "FP8 checkpoint with no weight_block_size"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128]}), "weight_block_size \\[128\\]"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128],
                               "activation_scheme": "static"}), "activation_scheme 'static'"),
])
def test_bad_fields_are_named(tmp_path, changes, message):
    if message is None:                      # a missing MLA key takes transformers' default
        assert load_model_spec(write(tmp_path, **changes)).mla.kv_lora_rank == 512
        return
    with pytest.raises(ModelConfigError, match=message):
        load_model_spec(write(tmp_path, **changes))


def test_deepseek_v3s_published_fp8_config_loads(tmp_path):
    fp8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    spec = load_model_spec(write(tmp_path, quantization_config=fp8))
    assert spec.quantization.weight_block_size == (128, 128) and spec.quantization.fmt == "e4m3"
    (tmp_path / "bf16").mkdir()
    assert load_model_spec(write(tmp_path / "bf16")).quantization is None


def test_tiny_deepseek_model_loads_in_transformers_without_missing_keys(tmp_path):
    out = tmp_path / "ds"
    result = subprocess.run([sys.executable, "-m", "epserve", "make-tiny-model", str(out), "--arch", "deepseek_v3",
                             "--num-layers", "3", "--num-experts", "8"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    spec = load_model_spec(out)
    assert spec.moe_layers == (1, 2) and spec.mla.q_lora_rank == 32 and spec.rope_scaling.factor == 4.0
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with safe_open(out / "model.safetensors", framework="pt") as written:
        assert set(checkpoint_shapes(spec)) == set(written.keys())
    info = json.loads((out / "epserve_tiny_model.json").read_text())
    assert info["calibration_load_share"][0] == [0.0] * 8                     # the dense layer has no router


def test_tiny_deepseek_needs_a_head_dim_divisible_by_4(tmp_path):
    from epserve.tiny_model import make_tiny_model

    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        make_tiny_model(tmp_path / "bad", arch="deepseek_v3", head_dim=6)


def test_dummy_weights_serve_a_deepseek_config(tmp_path):
    from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
    from epserve.sampling import SamplingParams

    small = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2,
                 num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
                 qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, vocab_size=300)
    engine = build_colocated_engine(str(write(tmp_path, **small)), torch.float32, load_format="dummy")
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    first = generate_tokens(engine, [[1, 2, 3, 4]], params)
    assert len(first[0]) == 6 and first == generate_tokens(engine, [[1, 2, 3, 4]], params)


# DeepSeek-V2-Lite's published config.json (the keys epserve and transformers read)
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001,
}


def write_v2(tmp_path, **changes):
    (tmp_path / "config.json").write_text(json.dumps({**DEEPSEEK_V2_LITE, **changes}))
    return tmp_path


def test_published_deepseek_v2_lite_config(tmp_path):
    spec = load_model_spec(write_v2(tmp_path))
    assert spec.model_type == "deepseek_v2" and spec.moe_layers == tuple(range(1, 27))
    assert spec.mla.q_lora_rank is None and spec.mla.rope_style == "complex" and spec.mla.cache_width == 576
    assert (spec.routing.scoring_func, spec.routing.topk_method, spec.routing.n_group) == ("softmax", "greedy", 1)
    assert spec.n_shared_experts == 2 and not spec.norm_topk_prob and spec.rope_scaling.mscale == 0.707
    # DeepSeek-V2: q_lora_rank and group-limited greedy routing over 8 groups
    v2 = load_model_spec(write_v2(tmp_path, q_lora_rank=1536, topk_method="group_limited_greedy", n_group=8,
                                  topk_group=3, routed_scaling_factor=16.0, n_routed_experts=160))
    assert v2.mla.q_lora_rank == 1536 and (v2.routing.n_group, v2.routing.topk_group) == (8, 3)
    assert v2.routing.routed_scaling_factor == 16.0


@pytest.mark.parametrize("changes,message", [
    (dict(topk_method="noaux_tc"), "topk_method 'greedy' or 'group_limited_greedy'"),
    (dict(scoring_func="sigmoid"), "scoring_func 'softmax'"),
    (dict(topk_method="group_limited_greedy", n_group=5), "n_group \\(5\\) must divide"),
    (dict(mlp_bias=True), "mlp_bias true is not supported"),
])
def test_bad_v2_fields_are_named(tmp_path, changes, message):
    with pytest.raises(ModelConfigError, match=message):
        load_model_spec(write_v2(tmp_path, **changes))


def test_v2_lite_checkpoint_names_match_transformers(tmp_path):
    small = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                 kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, vocab_size=300)
    spec = load_model_spec(write_v2(tmp_path, **small))
    config = transformers.DeepseekV2Config.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    theirs = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]
              if "rotary_emb" not in name and ".mlp.experts." not in name}
    assert {n: s for n, s in checkpoint_shapes(spec).items() if ".mlp.experts." not in n} == theirs
