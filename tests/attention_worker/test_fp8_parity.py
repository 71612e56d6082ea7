"""FP8 block-quantized DeepSeek-V3 checkpoints (DeepSeek's release format): epserve dequantizes at load time.

Parity 1: float32 logits of epserve on the FP8 checkpoint equal those of epserve on a float32 checkpoint
holding the dequantized weights (``tests/fp8_checkpoint.py``, a dequantization written independently of
epserve's), through the attention side and the expert slots; blocks of 16 x 24 leave partial blocks at
every edge (40-row, 96-row, 64-column tensors), and non-square blocks catch a transposed scale grid.

Parity 2: transformers 5.x loads the FP8 checkpoint on CPU by dequantizing it (its FineGrainedFP8 loader
falls back to ``dequantize=True`` without a GPU; it needs accelerate, a dev dependency); float64 greedy
tokens are identical. transformers derives the block size from the weight's shape over the scale grid, so
it dequantizes correctly only when the block divides every dimension: that test uses 8 x 8 blocks (with
128 x 128 it would read the tiny model's [192, 64] dense projections, whose grid is [2, 1], as 96-row
blocks; DeepSeek-V3's [576, 7168] kv_a_proj_with_mqa, grid [5, 56], it refuses).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from family_parity import OPTIONS, PROMPTS, ragged_logits, reference, relative_error
from fp8_checkpoint import dequantized_copy
from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.dummy_weights import DummyReader
from epserve.expert_map import ExpertMap
from epserve.model_config import ModelConfigError, load_model_spec
from epserve.models.expert_side import load_expert_slots
from epserve.sampling import SamplingParams
from epserve.weights import CheckpointReader

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def fp8_model(tiny_model_factory):
    return tiny_model_factory(seed=0, arch="deepseek_v3", quantization="fp8", weight_block_size=(16, 24), **OPTIONS)


@pytest.fixture(scope="module")
def float_model(fp8_model, tmp_path_factory):
    return dequantized_copy(fp8_model, tmp_path_factory.mktemp("dequantized") / "model")


def test_float32_logits_equal_the_dequantized_float_checkpoints(fp8_model, float_model):
    tok = transformers.AutoTokenizer.from_pretrained(fp8_model)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    quantized = ragged_logits(fp8_model, ids, torch.float32, num_micro_batches=2)
    dequantized = ragged_logits(float_model, ids, torch.float32, num_micro_batches=2)
    for got, want in zip(quantized, dequantized):
        assert relative_error(got, want) <= 1e-5


def test_loaded_weights_are_the_dequantized_ones_on_every_read_path(fp8_model, float_model, tiny_model_factory):
    """Attention-side tensors (``read``) and expert slots, read into given destinations (``read_experts``'
    straight-from-the-file path) or not, hold the dequantized values: not the FP8 codes, not the float
    model's weights before quantization."""
    fp8, plain = CheckpointReader(fp8_model, show_progress=False), CheckpointReader(float_model, show_progress=False)
    names = ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.1.mlp.gate.weight"]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        got, want = fp8.read(names, dtype), plain.read(names, dtype)
        for name in names:
            assert got[name].dtype == dtype and torch.equal(got[name], want[name]), name
    original = CheckpointReader(tiny_model_factory(seed=0, arch="deepseek_v3", **OPTIONS), show_progress=False)
    before = original.read(names[:1], torch.float32)[names[0]]
    assert not torch.equal(before, want[names[0]].float())
    assert (before - want[names[0]].float()).abs().max() < 0.05 * before.abs().max()   # FP8's rounding, no more
    spec = load_model_spec(fp8_model)
    expert_map = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts, 2, ("a", "b"))
    wanted = load_expert_slots(spec, plain, expert_map.phy2log, torch.float32)
    for slots in (load_expert_slots(spec, fp8, expert_map.phy2log, torch.float32),
                  load_expert_slots(spec, fp8, expert_map.phy2log[:, :5], torch.float32)):
        for layer in range(spec.num_moe_layers):
            for part, reference_part in zip(slots.layer_tensors(layer), wanted.layer_tensors(layer)):
                assert torch.equal(part, reference_part[:part.shape[0]])
    fresh = CheckpointReader(fp8_model, show_progress=False)
    experts = fresh.read_experts(1, [3, 7], torch.float32)          # no destinations: through read()
    reference_experts = plain.read_experts(1, [3, 7], torch.float32)
    for e in (3, 7):
        assert all(torch.equal(a, b) for a, b in zip(experts[e], reference_experts[e]))


def test_fp8_tensors_are_never_read_without_their_scales(fp8_model, tmp_path):
    """FP8 codes without a quantization_config (or without a scale) are refused, not cast to floats."""
    model = tmp_path / "model"
    shutil.copytree(fp8_model, model)
    config = json.loads((model / "config.json").read_text())
    del config["quantization_config"]
    (model / "config.json").write_text(json.dumps(config))
    reader = CheckpointReader(model, show_progress=False)
    with pytest.raises(ModelConfigError, match="o_proj.weight is stored as torch.float8_e4m3fn without"):
        reader.read(["model.layers.0.self_attn.o_proj.weight"], torch.float32)
    spec = load_model_spec(model)
    with pytest.raises(ModelConfigError, match="experts.0.gate_proj.weight is stored as torch.float8_e4m3fn"):
        load_expert_slots(spec, reader, ExpertMap.trivial(spec.num_moe_layers, spec.num_experts).phy2log,
                          torch.float32)


def test_greedy_tokens_equal_transformers_on_the_fp8_checkpoint(tiny_model_factory):
    model_dir = tiny_model_factory(seed=1, arch="deepseek_v3", quantization="fp8", weight_block_size=(8, 8), **OPTIONS)
    ref, tok = reference(model_dir, torch.float64)
    layer = ref.model.layers[0].self_attn.kv_a_proj_with_mqa.weight
    want = CheckpointReader(model_dir, show_progress=False).read(
        ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"], torch.float64)
    assert torch.equal(layer.detach(), next(iter(want.values())))      # transformers did dequantize
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine = build_colocated_engine(str(model_dir), torch.float64)
    ours = generate_tokens(engine, ids, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    for prompt_ids, got in zip(ids, ours):
        expected = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert got == expected


def test_dummy_weights_of_an_fp8_config_go_through_fp8(fp8_model, tmp_path):
    """--load-format dummy on an FP8 config: a quantized tensor holds at most 256 distinct magnitudes per
    block (e4m3 codes times the block's scale) and equals its float draw to FP8's precision; a tensor the
    checkpoint keeps in float (the router) is the float draw itself."""
    spec = load_model_spec(fp8_model)
    float_spec = load_model_spec(dequantized_copy(fp8_model, tmp_path / "float"))
    quantized, drawn = DummyReader(spec, show_progress=False), DummyReader(float_spec, show_progress=False)
    name, router = "model.layers.1.mlp.experts.2.gate_proj.weight", "model.layers.1.mlp.gate.weight"
    got, draw = quantized.read([name, router], torch.float32), drawn.read([name, router], torch.float32)
    assert torch.equal(got[router], draw[router])
    assert not torch.equal(got[name], draw[name])
    block = got[name][:16, :24]
    scale = draw[name][:16, :24].abs().max() / 448
    assert torch.equal(block, (draw[name][:16, :24] / scale).to(torch.float8_e4m3fn).float() * scale)
    w13, _ = quantized.read_experts(1, [2], torch.float32)[2]
    assert torch.equal(w13[:spec.moe_intermediate_size], got[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dequantized_on_the_gpu_as_on_the_cpu(fp8_model, tmp_path):
    """The FP8 bytes travel to the GPU and are dequantized there: the same values as on the CPU (attention
    tensors, expert slots in bfloat16), and dummy FP8 weights drawn on the GPU go through FP8 there."""
    reader = CheckpointReader(fp8_model, show_progress=False)
    names = ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.down_proj.weight"]
    on_cpu, on_gpu = reader.read(names, torch.bfloat16), reader.read(names, torch.bfloat16, "cuda")
    assert all(on_gpu[n].is_cuda and torch.equal(on_gpu[n].cpu(), on_cpu[n]) for n in names)
    spec = load_model_spec(fp8_model)
    every_expert = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts).phy2log
    cpu_slots = load_expert_slots(spec, reader, every_expert, torch.bfloat16)
    gpu_slots = load_expert_slots(spec, reader, every_expert, torch.bfloat16, "cuda")
    for layer in range(spec.num_moe_layers):
        for a, b in zip(gpu_slots.layer_tensors(layer), cpu_slots.layer_tensors(layer)):
            assert a.is_cuda and torch.equal(a.cpu(), b)
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    float_spec = load_model_spec(dequantized_copy(fp8_model, tmp_path / "float"))
    got = DummyReader(spec, show_progress=False).read([name], torch.float32, "cuda")[name][:16, :24]
    draw = DummyReader(float_spec, show_progress=False).read([name], torch.float32, "cuda")[name][:16, :24]
    scale = draw.abs().max() / 448
    assert got.is_cuda and not torch.equal(got, draw)
    assert torch.equal(got, (draw / scale).to(torch.float8_e4m3fn).float() * scale)
