"""GatewayConfig validation, flags, model facts and the tokenizer's BOS rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import fields

import pytest
from gateway_testlib import CONTEXT_LENGTH, REPO_ROOT, build_tokenizer, write_model_dir

from epserve.gateway.config import GatewayConfig, build_parser, config_from_args
from epserve.model_config import load_model_spec
from epserve.tokenizer import Tokenizer


def test_flags_parse_into_config(gateway_model_dir) -> None:
    args = build_parser().parse_args(["--model-path", str(gateway_model_dir), "--port", "0",
                                      "--attention-workers", "127.0.0.1:1, 127.0.0.1:2", "--placement", "h:3",
                                      "--max-new-tokens-limit", "64", "--request-timeout-s", "9"])
    config = config_from_args(args)
    assert config.attention_workers == ("127.0.0.1:1", "127.0.0.1:2") and config.placement == "h:3"
    assert config.max_new_tokens_limit == 64 and config.request_timeout_s == 9


@pytest.mark.parametrize("changes, words", [
    ({"attention_workers": ()}, "--placement"),
    ({"attention_workers": ("nohost",)}, "--attention-workers"),
    ({"attention_workers": ("h:1", "h:1")}, "twice"),
    ({"placement": "h:99999"}, "--placement"),
    ({"port": -1}, "--port"),
    ({"max_new_tokens_limit": 0}, "--max-new-tokens-limit"),
    ({"request_timeout_s": 0}, "--request-timeout-s"),
    ({"rpc_timeout_s": -1}, "--rpc-timeout-s"),
    ({"max_retries": -1}, "--max-retries"),
    ({"model_path": "/nonexistent"}, "--model-path"),
])
def test_bad_config_says_what_to_change(gateway_model_dir, changes, words) -> None:
    kwargs = {"model_path": str(gateway_model_dir), "attention_workers": ("127.0.0.1:1",), **changes}
    with pytest.raises(ValueError, match=words):
        GatewayConfig(**kwargs)


def test_help_explains_every_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "epserve.gateway", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    for f in fields(GatewayConfig):
        assert "--" + f.name.replace("_", "-") in result.stdout


def test_bad_flag_exits_2_with_message(gateway_model_dir) -> None:
    result = subprocess.run([sys.executable, "-m", "epserve.gateway", "--model-path", str(gateway_model_dir)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--attention-workers" in result.stderr


def test_model_info_qwen3_moe(gateway_model_dir) -> None:
    info = load_model_spec(gateway_model_dir)
    assert info.architecture == "Qwen3MoeForCausalLM" and info.max_position_embeddings == CONTEXT_LENGTH
    assert (info.num_moe_layers, info.num_experts, info.num_experts_per_tok) == (2, 8, 2)
    assert len(info.eos_token_ids) == 2        # generation_config.json wins over config.json


def test_model_info_deepseek_layers_and_eos_fallback(tmp_path, gateway_model_dir) -> None:
    shutil.copy(gateway_model_dir / "tokenizer.json", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 320, "max_position_embeddings": 128,
        "num_hidden_layers": 5, "first_k_dense_replace": 2, "moe_layer_freq": 1, "n_routed_experts": 16,
        "num_experts_per_tok": 4, "eos_token_id": 1, "hidden_size": 32, "num_attention_heads": 4}))
    info = load_model_spec(tmp_path)
    assert (info.num_moe_layers, info.num_experts, info.eos_token_ids) == (3, 16, (1,))


def test_model_info_needs_context_length(tmp_path, gateway_model_dir) -> None:
    config = json.loads((gateway_model_dir / "config.json").read_text())
    del config["max_position_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load_model_spec(tmp_path)


def test_bos_added_only_when_tokenizer_config_says_so(tmp_path, gateway_tokenizer) -> None:
    with_bos = Tokenizer.from_dir(write_model_dir(tmp_path / "bos", build_tokenizer(), add_bos=True))
    assert gateway_tokenizer.bos_token_id is None
    assert with_bos.encode("hi") == [with_bos.bos_token_id, *gateway_tokenizer.encode("hi")]
    assert with_bos.decode(with_bos.encode("hi")) == "hi"
