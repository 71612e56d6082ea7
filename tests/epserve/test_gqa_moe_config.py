"""Mixtral and GLM-4-MoE config.json parsing: the published shapes, transformers' defaults for missing keys,
errors that name the field, checkpoint names equal to what transformers saves, the tiny models, dummy
weights and what the placement service reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from epserve.model_config import MIXTRAL_EXPERT_NAMES, ModelConfigError, load_model_spec
from epserve.models.glm4_moe import checkpoint_shapes as glm4_moe_shapes
from epserve.models.mixtral import checkpoint_shapes as mixtral_shapes

transformers = pytest.importorskip("transformers")

# Mixtral-8x7B's config.json (the keys epserve and transformers read)
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}
# GLM-4.5's config.json (the keys epserve and transformers read; its MTP layer is not served)
GLM4_5 = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 5120,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 92, "num_attention_heads": 96,
    "num_key_value_heads": 8, "head_dim": 128, "attention_bias": True, "use_qk_norm": True,
    "partial_rotary_factor": 0.5, "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "first_k_dense_replace": 3,
    "num_nextn_predict_layers": 1, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 1000000, "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
}
SMALL_MIXTRAL = dict(hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=4, vocab_size=300, max_position_embeddings=256)
SMALL_GLM = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, n_group=2,
                 topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=0,
                 vocab_size=300, max_position_embeddings=256, pad_token_id=None, eos_token_id=2)


def write(tmp_path, base, **changes):
    config = {**base, **changes}
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_published_mixtral_config(tmp_path):
    spec = load_model_spec(write(tmp_path, MIXTRAL))
    assert spec.model_type == "mixtral" and spec.num_experts == 8 and spec.num_experts_per_tok == 2
    assert spec.moe_layers == tuple(range(32)) and spec.moe_intermediate_size == 14336
    assert (spec.num_key_value_heads, spec.head_dim, spec.rotary_dim) == (8, 128, 128)
    assert spec.norm_topk_prob and not spec.qk_norm and not spec.attention_bias and spec.sliding_window is None
    assert spec.rope_theta == 1e6 and spec.rms_norm_eps == 1e-5 and spec.expert_names == MIXTRAL_EXPERT_NAMES
    assert spec.expert_names.per_expert(3, 5) == ("model.layers.3.block_sparse_moe.experts.5.w1.weight",
                                                  "model.layers.3.block_sparse_moe.experts.5.w3.weight",
                                                  "model.layers.3.block_sparse_moe.experts.5.w2.weight")


def test_mixtral_sliding_window_counts_only_when_shorter_than_the_positions(tmp_path):
    assert load_model_spec(write(tmp_path, MIXTRAL, sliding_window=4096)).sliding_window == 4096
    assert load_model_spec(write(tmp_path, MIXTRAL, sliding_window=32768)).sliding_window is None


def test_mixtral_missing_keys_take_transformers_defaults(tmp_path):
    spec = load_model_spec(write(tmp_path, MIXTRAL, num_local_experts=None, num_experts_per_tok=None,
                                 rms_norm_eps=None, rope_theta=None, num_key_value_heads=None))
    assert (spec.num_experts, spec.num_experts_per_tok, spec.num_key_value_heads) == (8, 2, 8)
    assert spec.rms_norm_eps == 1e-5 and spec.rope_theta == 1e6


def test_published_glm4_5_config(tmp_path):
    spec = load_model_spec(write(tmp_path, GLM4_5))
    assert spec.model_type == "glm4_moe" and spec.num_experts == 160 and spec.num_experts_per_tok == 8
    assert spec.moe_layers == tuple(range(3, 92)) and spec.num_moe_layers == 89
    assert (spec.head_dim, spec.rotary_dim, spec.num_key_value_heads) == (128, 64, 8)
    assert spec.qk_norm and spec.attention_bias and spec.n_shared_experts == 1 and spec.norm_topk_prob
    assert (spec.routing.scoring_func, spec.routing.topk_method, spec.routing.n_group, spec.routing.topk_group,
            spec.routing.routed_scaling_factor) == ("sigmoid", "noaux_tc", 1, 1, 2.5)
    assert spec.eos_token_ids == (151329, 151336, 151338)
    # GLM-4.5-Air: no q/k norms, one dense layer
    air = load_model_spec(write(tmp_path, GLM4_5, hidden_size=4096, num_hidden_layers=46, n_routed_experts=128,
                                first_k_dense_replace=1, use_qk_norm=False, routed_scaling_factor=1.0))
    assert air.moe_layers == tuple(range(1, 46)) and not air.qk_norm and air.routing.routed_scaling_factor == 1.0


def test_glm_missing_keys_take_transformers_defaults(tmp_path):
    spec = load_model_spec(write(tmp_path, GLM4_5, first_k_dense_replace=None, partial_rotary_factor=None,
                                 use_qk_norm=None, attention_bias=None, n_group=None, topk_group=None,
                                 n_routed_experts=None))
    assert spec.moe_layers[0] == 1 and spec.num_experts == 128 and spec.rotary_dim == 64
    assert not spec.qk_norm and not spec.attention_bias
    assert (spec.routing.n_group, spec.routing.topk_group) == (1, 1)
    # transformers 5 writes the rotary share into rope_parameters
    nested = load_model_spec(write(tmp_path, GLM4_5, partial_rotary_factor=None,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                    "partial_rotary_factor": 0.25}))
    assert nested.rotary_dim == 32


@pytest.mark.parametrize("base,changes,message", [
    (MIXTRAL, dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (MIXTRAL, dict(num_experts_per_tok=9), "num_experts_per_tok \\(9\\) must be in \\[1, num_experts=8\\]"),
    (MIXTRAL, dict(rope_scaling={"type": "linear", "factor": 2.0}), "only default RoPE is supported"),
    (MIXTRAL, dict(quantization_config={"quant_method": "mxfp4"}), "quantized checkpoints"),
    (GLM4_5, dict(n_group=3), "n_group \\(3\\) must divide n_routed_experts \\(160\\)"),
    (GLM4_5, dict(n_group=8, topk_group=1, num_experts_per_tok=24), "exceeds the 20 experts"),
    (GLM4_5, dict(partial_rotary_factor=0.2), "partial_rotary_factor \\(0.2\\) must turn an even number"),
    (GLM4_5, dict(num_key_value_heads=7), "must be a multiple of num_key_value_heads \\(7\\)"),
])
def test_bad_fields_are_named(tmp_path, base, changes, message):
    with pytest.raises(ModelConfigError, match=message):
        load_model_spec(write(tmp_path, base, **changes))


@pytest.mark.parametrize("base,small,shapes", [(MIXTRAL, SMALL_MIXTRAL, mixtral_shapes),
                                               (GLM4_5, SMALL_GLM, glm4_moe_shapes)])
def test_checkpoint_names_match_what_transformers_saves(tmp_path, base, small, shapes):
    """Our one description of the checkpoint equals the tensors transformers writes (its Hub layout)."""
    spec = load_model_spec(write(tmp_path, base, **small))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", framework="pt") as saved:
        theirs = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    assert shapes(spec) == theirs


@pytest.mark.parametrize("arch,shapes", [("mixtral", mixtral_shapes), ("glm4_moe", glm4_moe_shapes)])
def test_tiny_model_loads_in_transformers_without_missing_keys(tmp_path, arch, shapes):
    out = tmp_path / arch
    result = subprocess.run([sys.executable, "-m", "epserve", "make-tiny-model", str(out), "--arch", arch,
                             "--num-layers", "3", "--num-experts", "8"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    spec = load_model_spec(out)
    assert spec.moe_layers == ((0, 1, 2) if arch == "mixtral" else (1, 2))
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with safe_open(out / "model.safetensors", framework="pt") as written:
        assert set(shapes(spec)) == set(written.keys())


def test_tiny_glm_needs_a_head_dim_divisible_by_4(tmp_path):
    from epserve.tiny_model import make_tiny_model

    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        make_tiny_model(tmp_path / "bad", arch="glm4_moe", head_dim=6, num_attention_heads=4)


@pytest.mark.parametrize("base,small", [(MIXTRAL, SMALL_MIXTRAL), (GLM4_5, SMALL_GLM)])
def test_dummy_weights_serve_the_config(tmp_path, base, small):
    from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
    from epserve.sampling import SamplingParams

    engine = build_colocated_engine(str(write(tmp_path, base, **small)), torch.float32, load_format="dummy")
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    first = generate_tokens(engine, [[1, 2, 3, 4]], params)
    assert len(first[0]) == 6 and first == generate_tokens(engine, [[1, 2, 3, 4]], params)


def test_placement_reads_the_families(tmp_path):
    from epserve.placement_service.config import PlacementConfig

    def placement_model(base, **changes):
        return PlacementConfig(str(write(tmp_path, base, **changes)), ep_size=1).model

    mixtral = placement_model(MIXTRAL)
    assert (mixtral.moe_layers, mixtral.num_experts, mixtral.num_expert_groups) == (tuple(range(32)), 8, 0)
    assert mixtral.expert_bytes(2) == 3 * 4096 * 14336 * 2
    glm = placement_model(GLM4_5)
    assert (glm.moe_layers, glm.num_experts, glm.num_expert_groups) == (tuple(range(3, 92)), 160, 0)
    assert placement_model(GLM4_5, n_group=8, topk_group=4).num_expert_groups == 8
    assert placement_model(GLM4_5, first_k_dense_replace=None).moe_layers[0] == 1
