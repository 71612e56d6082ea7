"""epserve.tiny_model / `epserve make-tiny-model`: HF format, tokenizer, determinism, sharding, router skew."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epserve import tokenizer_build
from epserve.tiny_model import TinyModelOptions, default_model_dir, make_tiny_model, zipf_load_share

transformers = pytest.importorskip("transformers")

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "café naïve crème brûlée Straße Ærøskøbing",
    "東京駅 こんにちは 안녕하세요 天地玄黄，宇宙洪荒。",
    "emoji 🎉🚀 👍🏽 family 👨‍👩‍👧‍👦 flags 🇬🇧🇯🇵",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
    "  spaces\tand tabs\n\nnewlines  \r\n",
    "code: x = f(a[i], {'k': 1}) ** 2  # comment",
    "<|im_start|>user\nhi<|im_end|>",
    "zzzzqqqqxxxx 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u00a0\u200b",
]


def _load_hf(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                                             experts_implementation="eager")


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        part = load_file(path)
        assert not set(part) & set(tensors), f"{path.name} repeats tensors"
        tensors.update(part)
    return tensors


def _assert_hf_weights_equal(model, tensors: dict[str, torch.Tensor]) -> None:
    """transformers fuses per-expert gate/up/down into [E, 2I, D] / [E, D, I]; compare exactly."""
    config = model.config
    state = model.state_dict()
    names = {f"model.layers.{l}.mlp.experts.{e}.{p}.weight" for l in range(config.num_hidden_layers)
             for e in range(config.num_experts) for p in ("gate_proj", "up_proj", "down_proj")}
    assert names <= set(tensors)
    for l in range(config.num_hidden_layers):
        prefix = f"model.layers.{l}.mlp.experts."
        gate_up = torch.stack([torch.cat([tensors[f"{prefix}{e}.gate_proj.weight"],
                                          tensors[f"{prefix}{e}.up_proj.weight"]]) for e in range(config.num_experts)])
        down = torch.stack([tensors[f"{prefix}{e}.down_proj.weight"] for e in range(config.num_experts)])
        assert torch.equal(state[prefix + "gate_up_proj"], gate_up.double())
        assert torch.equal(state[prefix + "down_proj"], down.double())
    dense = {k: v for k, v in tensors.items() if k not in names}
    assert set(dense) | {f"model.layers.{l}.mlp.experts.{p}" for l in range(config.num_hidden_layers)
                         for p in ("gate_up_proj", "down_proj")} == set(state)
    for name, tensor in dense.items():
        assert torch.equal(state[name], tensor.double()), name


def _expert_load_share(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Share of top-k assignments per expert measured by transformers: [L, E]."""
    with torch.no_grad():
        out = model(input_ids=input_ids, output_router_logits=True)
    k, num_experts = model.config.num_experts_per_tok, model.config.num_experts
    shares = []
    for logits in out.router_logits:  # [T, E] per layer
        counts = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=num_experts).double()
        shares.append(counts / counts.sum())
    return torch.stack(shares)


def _file_hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_transformers_loads_model_and_weights_equal_files(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["model_type"] == "qwen3_moe"
    model = _load_hf(tiny_model)
    c = model.config
    assert (c.num_hidden_layers, c.num_experts, c.num_experts_per_tok, c.hidden_size, c.head_dim) == (2, 8, 2, 64, 16)
    assert c.norm_topk_prob is True and c.tie_word_embeddings is False and c.mlp_only_layers == []
    assert c.rope_parameters["rope_theta"] == config["rope_theta"]
    assert model.generation_config.do_sample is False
    assert c.eos_token_id in model.generation_config.eos_token_id
    tensors = _read_safetensors(tiny_model)
    assert "model.layers.1.mlp.gate.weight" in tensors and "model.layers.0.self_attn.q_norm.weight" in tensors
    _assert_hf_weights_equal(model, tensors)
    norm = tensors["model.layers.0.post_attention_layernorm.weight"]
    assert not torch.allclose(norm, torch.ones_like(norm)) and 0.5 < float(norm.mean()) < 1.5


def test_greedy_continuations_are_not_degenerate(tiny_model):
    model = _load_hf(tiny_model)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    prompts = ["The lighthouse keeper", "def fibonacci(n):", "café naïve", "1234 + 5678 =", "Dear Sam,",
               "東京駅", "Why is the sky blue?", "SELECT name FROM"]
    distinct = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        distinct.append(len(set(out[0, ids.shape[1]:].tolist())))
    assert sum(n == 1 for n in distinct) <= 1, distinct
    assert sorted(distinct)[len(distinct) // 2] >= 8, distinct


def test_tokenizer_round_trips_and_chat_template(tiny_model):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    raw = tokenizer_build.train_tokenizer(1024)
    config = json.loads((tiny_model / "config.json").read_text())
    assert len(tok) <= config["vocab_size"]
    assert tok.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == config["bos_token_id"] == tok.pad_token_id
    for text in ROUND_TRIP_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text).ids
        assert tok.decode(ids) == text
    assert tok("<|im_start|>")["input_ids"] == [tok.convert_tokens_to_ids("<|im_start|>")]
    corpus = tokenizer_build.read_corpus()
    assert tok(corpus)["input_ids"] == raw.encode(corpus).ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ça va? 👋"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nÇa va? 👋<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.decode(tok(text)["input_ids"]) == text


def test_same_seed_same_files_other_seed_other_weights(tiny_model, tmp_path):
    again = make_tiny_model(tmp_path / "again", seed=0)
    assert _file_hashes(again) == _file_hashes(tiny_model)
    other = make_tiny_model(tmp_path / "other", seed=1)
    a, b = _read_safetensors(tiny_model), _read_safetensors(other)
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[name], b[name]) for name in a)
    hashes = _file_hashes(other)
    assert hashes["tokenizer.json"] == _file_hashes(tiny_model)["tokenizer.json"]


def test_sharded_index_covers_all_tensors_and_splits_a_layer(tmp_path):
    opts = TinyModelOptions()
    expert_bytes = 3 * opts.hidden_size * opts.moe_intermediate_size * 2  # one bf16 expert
    model_dir = make_tiny_model(tmp_path / "sharded", max_shard_size=3 * expert_bytes, dtype="bfloat16")
    assert not (model_dir / "model.safetensors").exists()
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(files)
    in_files = {}
    for name in files:
        for tensor_name, tensor in load_file(model_dir / name).items():
            assert index["weight_map"][tensor_name] == name
            in_files[tensor_name] = tensor
    assert set(in_files) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in in_files.values())
    assert all(t.dtype == torch.bfloat16 for t in in_files.values())
    layer0 = {index["weight_map"][f"model.layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(opts.num_experts)}
    assert len(layer0) > 1
    _assert_hf_weights_equal(_load_hf(model_dir), in_files)


def test_zipf_load_share_is_capped_and_normalised():
    share = zipf_load_share(8, 2, 1.2)
    assert torch.isclose(share.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(share[0] / share[1], torch.tensor(2 ** 1.2, dtype=torch.float64))
    capped = zipf_load_share(16, 4, 1.2)  # uncapped the hottest would take 0.36 > 1/4
    assert torch.isclose(capped[0], torch.tensor(0.95 / 4, dtype=torch.float64)) and bool((capped.diff() <= 0).all())
    assert torch.isclose(capped.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(zipf_load_share(8, 2, 0.0), torch.full((8,), 1 / 8, dtype=torch.float64))


def test_router_skew_follows_zipf_measured_by_transformers(tiny_model, tmp_path):
    skewed = make_tiny_model(tmp_path / "skewed", router_skew=1.2, num_layers=3)
    info = json.loads((skewed / "epserve_tiny_model.json").read_text())
    target = torch.tensor(info["target_load_share"], dtype=torch.float64)  # [L, E]
    ids = torch.tensor(tokenizer_build.train_tokenizer(1024).encode(tokenizer_build.read_corpus()).ids)
    ids = ids[29: 29 + 48 * 96].view(48, 96)  # other windows than the calibration's 64-token rows
    uniform = _expert_load_share(_load_hf(tiny_model), ids)
    measured = _expert_load_share(_load_hf(skewed), ids)
    assert float(uniform.max()) < 1.5 / 8, uniform
    hot = measured.argmax(-1)
    assert hot.tolist() == target.argmax(-1).tolist() and len(set(hot.tolist())) == 3
    for layer in range(3):
        top = measured[layer].sort(descending=True).values
        assert float(top[0]) > 2.5 * float(uniform.max())
        assert _spearman(measured[layer], target[layer]) > 0.9
        assert 2 ** 1.2 / 1.3 < float(top[0] / top[1]) < 2 ** 1.2 * 1.3
        assert torch.allclose(measured[layer], target[layer], atol=0.02), (measured[layer], target[layer])


def test_cli_writes_same_model_as_api_and_rejects_unknown_arch(tiny_model, tmp_path):
    epserve = str(Path(sys.executable).parent / "epserve")
    out = tmp_path / "cli"
    proc = subprocess.run([epserve, "make-tiny-model", str(out), "--arch", "qwen3_moe"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stderr
    assert _file_hashes(out) == _file_hashes(tiny_model)  # also: tokenizer training is deterministic across processes
    bad = subprocess.run([epserve, "make-tiny-model", str(tmp_path / "bad"), "--arch", "deepseek_v9"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "qwen3_moe" in bad.stderr and not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="qwen3_moe"):
        make_tiny_model(tmp_path / "bad", arch="deepseek_v9")


def test_cli_help_lists_every_flag_and_defaults_match_api():
    from epserve.cli import build_parser
    from epserve.commands import make_tiny_model as command

    assert command.DEFAULTS == dataclasses.asdict(TinyModelOptions())
    help_text = subprocess.run([sys.executable, "-m", "epserve", "make-tiny-model", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    for field in dataclasses.fields(TinyModelOptions):
        assert "--" + field.name.replace("_", "-") in help_text
    args = build_parser().parse_args(["make-tiny-model", "d", "--max-shard-size", "1.5KiB"])
    assert args.max_shard_size == 1536
    with pytest.raises(SystemExit):
        build_parser().parse_args(["make-tiny-model", "d", "--max-shard-size", "12 parsecs"])


def test_default_model_dir_is_built_once_under_races(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temporary directory left behind
    assert re.fullmatch(r"tiny-qwen3_moe-[0-9a-f]{12}", results[0].name)
    config = json.loads((results[0] / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_experts"], config["num_experts_per_tok"]) == (4, 16, 4)
    mtime = (results[0] / "config.json").stat().st_mtime_ns
    assert default_model_dir(tmp_path) == results[0]
    assert (results[0] / "config.json").stat().st_mtime_ns == mtime
