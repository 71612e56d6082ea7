"""GPT-OSS config.json parsing: the published shape (less its MXFP4 quantization, which is refused),
transformers' defaults for missing keys, errors that name the field, checkpoint names equal to what
transformers saves, the tiny model, dummy weights and what the placement service reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from epserve.model_config import ModelConfigError, load_model_spec
from epserve.models.gpt_oss import checkpoint_shapes

transformers = pytest.importorskip("transformers")

# gpt-oss-20b's config.json (the keys epserve and transformers read), without its quantization_config
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "attention_bias": True,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "sliding_window": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 150000, "swiglu_limit": 7.0,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "hidden_act": "silu", "tie_word_embeddings": False, "eos_token_id": 200002, "pad_token_id": 199999,
}
SMALL = dict(hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=300, max_position_embeddings=256,
             layer_types=None, pad_token_id=None, eos_token_id=2)


def write(tmp_path, **changes):
    config = {**GPT_OSS_20B, **changes}
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_published_gpt_oss_20b_config(tmp_path):
    spec = load_model_spec(write(tmp_path))
    assert spec.model_type == "gpt_oss" and spec.num_experts == 32 and spec.num_experts_per_tok == 4
    assert spec.moe_layers == tuple(range(24)) and spec.moe_intermediate_size == 2880
    assert (spec.head_dim, spec.num_key_value_heads, spec.sliding_window) == (64, 8, 128)
    assert spec.full_attention_layers == tuple(range(1, 24, 2))
    assert spec.attention_window(0) == 128 and spec.attention_window(1) is None
    assert spec.attention_sinks and spec.attention_bias and not spec.qk_norm and spec.expert_bias
    assert (spec.swiglu_alpha, spec.swiglu_limit) == (1.702, 7.0) and spec.routing.topk_method == "topk_softmax"
    assert spec.rope_theta == 150000 and spec.rope_scaling.factor == 32 and not spec.rope_scaling.truncate
    assert spec.rope_scaling.original_max_position_embeddings == 4096


def test_published_mxfp4_checkpoint_is_refused(tmp_path):
    with pytest.raises(ModelConfigError, match="quantized checkpoints \\(mxfp4\\)"):
        load_model_spec(write(tmp_path, quantization_config={"quant_method": "mxfp4"}))


def test_missing_keys_take_transformers_defaults(tmp_path):
    spec = load_model_spec(write(tmp_path, layer_types=None, rope_scaling=None, swiglu_limit=None, sliding_window=None,
                                 num_local_experts=None, rope_theta=None))
    assert spec.full_attention_layers == tuple(range(1, 24, 2)) and spec.sliding_window == 128
    assert spec.num_experts == 128 and spec.swiglu_limit == 7.0 and spec.rope_theta == 150000.0
    assert spec.rope_scaling.factor == 32.0 and spec.rope_scaling.beta_fast == 32.0 and not spec.rope_scaling.truncate


@pytest.mark.parametrize("changes,message", [
    (dict(layer_types=["sliding_attention"] * 23), "layer_types must list sliding_attention or full_attention"),
    (dict(layer_types=["chunked_attention"] * 24), "layer_types must list"),
    (dict(attention_bias=False), "attention_bias false is not supported for GPT-OSS"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope scaling 'linear' is not supported"),
])
def test_bad_fields_are_named(tmp_path, changes, message):
    with pytest.raises(ModelConfigError, match=message):
        load_model_spec(write(tmp_path, **changes))


def test_checkpoint_names_match_what_transformers_saves(tmp_path):
    spec = load_model_spec(write(tmp_path, **SMALL))
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", framework="pt") as saved:
        theirs = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    assert checkpoint_shapes(spec) == theirs


def test_tiny_model_loads_in_transformers_without_missing_keys(tmp_path):
    out = tmp_path / "gpt_oss"
    result = subprocess.run([sys.executable, "-m", "epserve", "make-tiny-model", str(out), "--arch", "gpt_oss",
                             "--num-layers", "3", "--num-experts", "8"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    spec = load_model_spec(out)
    assert spec.full_attention_layers == (1,) and spec.sliding_window == 8 and spec.swiglu_limit == 1.5
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with safe_open(out / "model.safetensors", framework="pt") as written:
        assert set(checkpoint_shapes(spec)) == set(written.keys())


def test_dummy_weights_serve_the_config(tmp_path):
    from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
    from epserve.sampling import SamplingParams
    from epserve.dummy_weights import DummyReader
    from epserve.models.expert_side import load_expert_slots

    model_dir = write(tmp_path, **SMALL)
    engine = build_colocated_engine(str(model_dir), torch.float32, load_format="dummy")
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    first = generate_tokens(engine, [[1, 2, 3, 4]], params)
    assert len(first[0]) == 6 and first == generate_tokens(engine, [[1, 2, 3, 4]], params)
    # an expert's values do not depend on the slot, the worker or the other experts loaded with it
    spec = load_model_spec(model_dir)
    alone = load_expert_slots(spec, DummyReader(spec, show_progress=False), torch.tensor([[3], [3]]), torch.float32)
    crowd = load_expert_slots(spec, DummyReader(spec, show_progress=False), torch.tensor([[0, 3], [2, 3]]),
                              torch.float32)
    for got, want in zip(crowd.layer_tensors(1), alone.layer_tensors(1)):
        assert torch.equal(got[1], want[0]) and want[0].std() > 0


def test_placement_reads_gpt_oss(tmp_path):
    from epserve.placement_service.config import PlacementConfig

    info = PlacementConfig(str(write(tmp_path)), ep_size=1).model
    assert (info.moe_layers, info.num_experts, info.num_expert_groups) == (tuple(range(24)), 32, 0)
    assert info.expert_bytes(2) == 3 * 2880 * 2880 * 2
