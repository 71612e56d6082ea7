"""Model config validation: errors name the field and say what to change."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from epserve.model_config import ModelConfigError, check_parallel_sizes, load_model_spec


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    target = tmp_path / "m"
    shutil.copytree(tiny_model, target)
    return target


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_spec_reads_qwen3_moe(tiny_model):
    spec = load_model_spec(tiny_model)
    assert spec.architecture == "Qwen3MoeForCausalLM" and spec.num_moe_layers == spec.num_hidden_layers
    assert spec.eos_token_ids and spec.head_dim * spec.num_attention_heads > 0


def test_unsupported_architecture_names_the_supported_ones(model_copy):
    edit_config(model_copy, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ModelConfigError, match="supported architectures: \\['DeepseekV2ForCausalLM', "
                       "'DeepseekV3ForCausalLM', 'Glm4MoeForCausalLM', 'GptOssForCausalLM', "
                       "'MixtralForCausalLM', 'Qwen3MoeForCausalLM'\\]"):
        load_model_spec(model_copy)


def test_missing_field_is_named(model_copy):
    edit_config(model_copy, num_experts_per_tok=None)
    with pytest.raises(ModelConfigError, match="no 'num_experts_per_tok' field"):
        load_model_spec(model_copy)


@pytest.mark.parametrize("changes,message", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(num_experts_per_tok=100), "must be in \\[1, num_experts"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "only default RoPE"),
    (dict(mlp_only_layers=[0], intermediate_size=0), "intermediate_size is missing"),
])
def test_inconsistent_fields_are_refused(model_copy, changes, message):
    edit_config(model_copy, **changes)
    with pytest.raises(ModelConfigError, match=message):
        load_model_spec(model_copy)


def test_missing_directory_or_json(tmp_path):
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_model_spec(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_model_spec(tmp_path)


def test_ep_sizing_rules(tiny_model):
    spec = load_model_spec(tiny_model)
    check_parallel_sizes(spec, tp_size=4, ep_size=2)
    with pytest.raises(ModelConfigError, match="--tp-size \\(4\\) must be a multiple of --ep-size \\(3\\)"):
        check_parallel_sizes(spec, tp_size=4, ep_size=3)
    with pytest.raises(ModelConfigError, match="moe_intermediate_size \\(32\\) must be divisible by "
                                               "--tp-size / --ep-size = 3"):
        check_parallel_sizes(spec, tp_size=3, ep_size=1)


def test_generate_cli_reports_bad_config_with_exit_code_2(model_copy):
    edit_config(model_copy, architectures=["LlamaForCausalLM"])
    result = subprocess.run([sys.executable, "-m", "epserve", "generate", "--model-path", str(model_copy),
                             "--prompt", "hi"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not supported" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("sizes,message", [
    (["--expert-workers", "3", "--tp-size", "4"], "--tp-size \\(4\\) must be a multiple of --ep-size \\(3\\)"),
    (["--expert-workers", "2", "--tp-size", "6"], "must be divisible by --tp-size / --ep-size = 3"),
    (["--expert-load-duty-cycle", "0"], "--expert-load-duty-cycle must be in \\(0, 1\\], got 0.0"),
    (["--stream-interval", "0"], "--stream-interval must be >= 1, got 0"),
])
def test_epserve_up_refuses_bad_ep_sizes_before_starting_anything(tiny_model, sizes, message):
    result = subprocess.run([sys.executable, "-m", "epserve", "up", "--model-path", str(tiny_model), *sizes],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr
