"""FP8 block-quantized checkpoints through the CLI: ``epserve make-tiny-model --quantization fp8`` writes
DeepSeek-V3's release format (which tensors, their bytes, the scales, config.json); ``epserve up`` refuses
every other quantization and, for block-quantized checkpoints, SGLang's block divisibility rule, each
with exit code 2 and a message naming what to change."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

# DeepSeek-V3's published checkpoints store these in FP8 (each with a weight_scale_inv), and nothing else:
# the MLA projections, the dense MLPs, the shared and the routed experts
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                       r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight")


def make(directory, *args):
    return subprocess.run([sys.executable, "-m", "epserve", "make-tiny-model", str(directory), "--arch", "deepseek_v3",
                           *args], capture_output=True, text=True, timeout=300)


def tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("block_args,block", [([], (128, 128)), (["--weight-block-size", "16,24"], (16, 24))])
def test_make_tiny_model_writes_deepseeks_fp8_format(tmp_path, block_args, block):
    assert make(tmp_path / "float").returncode == 0
    result = make(tmp_path / "fp8", "--quantization", "fp8", *block_args)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config.pop("quantization_config") == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                 "weight_block_size": list(block)}
    assert config == json.loads((tmp_path / "float" / "config.json").read_text())
    original, written = tensors(tmp_path / "float"), tensors(tmp_path / "fp8")
    quantized = {name for name in original if QUANTIZED.fullmatch(name)}
    assert {n for n in written if n.endswith("_scale_inv")} == {n + "_scale_inv" for n in quantized}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.gate.e_score_correction_bias", "model.norm.weight",
            "model.layers.0.self_attn.kv_a_layernorm.weight"}.isdisjoint(quantized)
    assert len(written) == len(original) + len(quantized)
    n, k = block
    for name, w in original.items():
        if name not in quantized:
            assert torch.equal(written[name], w), name
            continue
        q, scale = written[name], written[name + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.dtype == torch.float32
        assert scale.shape == (-(-w.shape[0] // n), -(-w.shape[1] // k))
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                part = w[i * n:(i + 1) * n, j * k:(j + 1) * k]
                assert scale[i, j] == part.abs().max() / 448
                codes = q[i * n:(i + 1) * n, j * k:(j + 1) * k]
                want = (part / scale[i, j]).to(torch.float8_e4m3fn)
                assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("args,message", [
    (["--arch", "qwen3_moe", "--quantization", "fp8"], "--quantization fp8 is built for --arch deepseek_v3 only"),
    (["--arch", "deepseek_v3", "--quantization", "fp8", "--weight-block-size", "128"], "not a block size"),
])
def test_make_tiny_model_refuses_what_it_does_not_write(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "epserve", "make-tiny-model", str(tmp_path / "m"), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "m" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def fp8_model(tiny_model_factory):
    """moe_intermediate_size 32: not a multiple of DeepSeek's 128 x 128 blocks."""
    return tiny_model_factory(arch="deepseek_v3", quantization="fp8")


def up(model, *args):
    return subprocess.run([sys.executable, "-m", "epserve", "up", "--model-path", str(model), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("quantization,message", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "quantized checkpoints (awq) are not supported"),
    ({"quant_method": "gptq", "bits": 4}, "quantized checkpoints (gptq) are not supported"),
    ({"quant_method": "compressed-tensors"}, "quantized checkpoints (compressed-tensors) are not supported"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "no weight_block_size"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt 'e5m2'"),
])
def test_epserve_up_refuses_other_quantizations(fp8_model, tmp_path, quantization, message):
    model = tmp_path / "model"
    shutil.copytree(fp8_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    result = up(model)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "FP8 block-quantized checkpoints" in result.stderr, result.stderr


def test_epserve_up_refuses_gpt_oss_mxfp4(tiny_model_factory, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory(arch="gpt_oss", num_layers=2), model)
    config = json.loads((model / "config.json").read_text())
    mxfp4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": mxfp4}))
    result = up(model)
    assert result.returncode == 2
    assert ("quantized checkpoints (mxfp4) are not supported; epserve reads FP8 block-quantized checkpoints"
            in result.stderr), result.stderr


@pytest.mark.parametrize("block,args,message", [
    ((128, 128), [], r"moe_intermediate_size \(32\) / moe_tp_size \(1\) = 32 must be divisible by the block's rows "
                     r"\(128\), where moe_tp_size = --tp-size \(2\) / --ep-size \(2\)"),
    ((16, 64), ["--expert-workers", "4"], r"= 32 must be divisible by the block's columns \(64\), where moe_tp_size = "
                                          r"--tp-size \(4\) / --ep-size \(4\)"),
    ((16, 16), ["--expert-workers", "1", "--tp-size", "4"], r"moe_intermediate_size \(32\) / moe_tp_size \(4\) = 8 "
                                                            r"must be divisible by the block's rows \(16\)"),
])
def test_epserve_up_refuses_blocks_that_split_the_experts(tiny_model_factory, block, args, message):
    model = tiny_model_factory(arch="deepseek_v3", quantization="fp8", weight_block_size=block)
    result = up(model, *args)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr


def test_the_divisibility_rule_passes_whole_blocks(tiny_model_factory):
    from epserve.model_config import check_parallel_sizes, load_model_spec

    spec = load_model_spec(tiny_model_factory(arch="deepseek_v3", quantization="fp8", weight_block_size=(16, 16)))
    check_parallel_sizes(spec, tp_size=2, ep_size=2)
    check_parallel_sizes(spec, tp_size=4, ep_size=2)          # 32 / 2 = 16: one block per rank
