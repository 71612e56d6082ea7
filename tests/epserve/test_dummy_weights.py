"""--load-format dummy: random weights drawn per checkpoint name, no safetensors read.

Legend: T tokens, D hidden, E experts, K top-k, V vocab.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from epserve_up import epserve_up
from epserve.dummy_weights import LOAD_FORMATS, DummyReader, checkpoint_shapes, open_weights
from epserve.model_config import ModelConfigError, load_model_spec
from epserve.models.expert_side import load_expert_slots
from epserve.model_config import model_fingerprint
from epserve.placement_client import PlacementClient
from epserve.placement_types import WorkerRole
from epserve.weights import CheckpointReader

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dummy_model(tiny_model, tmp_path) -> Path:
    """A copy of the tiny model without its weights: config, generation config and tokenizer only."""
    target = tmp_path / "dummy"
    shutil.copytree(tiny_model, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return target


def write_config(directory: Path, **fields) -> Path:
    """A Qwen3-MoE config.json (no weights) with ``fields`` over small defaults."""
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 512,
              "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
              "rope_theta": 1e6, "rms_norm_eps": 1e-6, "num_experts": 8, "num_experts_per_tok": 2,
              "norm_topk_prob": True, "tie_word_embeddings": False, "eos_token_id": 0, **fields}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


# -- determinism ----------------------------------------------------------------------------------
def test_same_name_same_values_whatever_the_call_or_order(dummy_model):
    spec = load_model_spec(dummy_model)
    names = list(checkpoint_shapes(spec))
    first = DummyReader(spec, show_progress=False).read(names, torch.float32)
    reader = DummyReader(spec, show_progress=False)
    backwards = reader.read(reversed(names), torch.float32)
    again = reader.read(names[5:9], torch.float32)
    assert all(torch.equal(first[n], backwards[n]) for n in names)
    assert all(torch.equal(first[n], again[n]) for n in names[5:9])
    assert not torch.equal(first["model.layers.0.self_attn.q_proj.weight"][:16],
                           first["model.layers.1.self_attn.q_proj.weight"][:16])     # names differ → values differ
    assert reader.tensors_read[-4:] == names[5:9]


def test_same_values_in_another_process(dummy_model):
    spec = load_model_spec(dummy_model)
    reader = DummyReader(spec, show_progress=False)
    here = [digest(reader.read(["model.embed_tokens.weight"], torch.bfloat16)["model.embed_tokens.weight"]),
            digest(reader.read_experts(1, [5], torch.float32)[5][0])]
    code = ("import hashlib, sys, torch\n"
            "from epserve.dummy_weights import DummyReader\n"
            "from epserve.model_config import load_model_spec\n"
            "torch.set_num_threads(2)\n"
            "def digest(t):\n"
            "    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]\n"
            "reader = DummyReader(load_model_spec(sys.argv[1]), show_progress=False)\n"
            "print(digest(reader.read_experts(1, [2, 5], torch.float32)[5][0]))\n"     # other experts first
            "print(digest(reader.read(['model.embed_tokens.weight'], torch.bfloat16)['model.embed_tokens.weight']))\n")
    result = subprocess.run([sys.executable, "-c", code, str(dummy_model)], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [here[1], here[0]]


def test_an_expert_has_the_same_weights_in_any_slot(dummy_model):
    spec = load_model_spec(dummy_model)
    reader = DummyReader(spec, show_progress=False)
    layers = spec.num_moe_layers
    # expert 3 in slot 0 and again in slot 2 (a replica), expert 6 in slot 1; then a map moving them
    first = load_expert_slots(spec, reader, torch.tensor([[3, 6, 3, -1]] * layers), torch.float32)
    moved = load_expert_slots(spec, DummyReader(spec, show_progress=False), torch.tensor([[6, -1, 1, 3]] * layers),
                              torch.float32)
    direct = reader.read_experts(spec.moe_layers[-1], [3, 6], torch.float32)
    last = layers - 1
    for slots, slot_of in ((first, {3: 0, 6: 1}), (moved, {3: 3, 6: 0})):
        for expert, slot in slot_of.items():
            assert torch.equal(slots.w13[last][slot], direct[expert][0])
            assert torch.equal(slots.w2[last][slot], direct[expert][1])
    assert torch.equal(first.w13[0][2], first.w13[0][0])
    assert not first.w13[0][3].any()                                       # empty slot stays zero


def test_expert_store_map_changes_keep_each_experts_weights(dummy_model):
    """Live rebalancing: a new map's experts are copied from held slots or drawn again; all match."""
    from epserve.expert_map import ExpertMap
    from epserve.expert_worker.expert_store import ExpertStore
    from epserve.moe_runner import make_moe_runner

    spec = load_model_spec(dummy_model)
    reader = DummyReader(spec, show_progress=False)
    store = ExpertStore(spec, reader, "b", make_moe_runner("torch", "cpu"), torch.float32)
    first = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts, 2, ("a", "b"), version=1)
    moved = ExpertMap(first.phy2log.roll(3, dims=1), spec.num_experts, 2, ("a", "b"))
    expected = DummyReader(spec, show_progress=False)
    for expert_map in (first, moved):
        slots = store.install(expert_map)
        for moe_layer, layer in enumerate(spec.moe_layers):
            for slot, expert in enumerate(slots.slot_experts[moe_layer].tolist()):
                w13, w2 = expected.read_experts(layer, [expert], torch.float32)[expert]
                assert torch.equal(slots.w13[moe_layer][slot], w13) and torch.equal(slots.w2[moe_layer][slot], w2)


def test_bfloat16_is_the_rounding_of_float32(dummy_model):
    spec = load_model_spec(dummy_model)
    names = ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight"]
    reader = DummyReader(spec, show_progress=False)
    fp32, bf16, fp64 = (reader.read(names, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float64))
    for name in names:
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], fp32[name].to(torch.bfloat16))
        assert torch.equal(fp64[name], fp32[name].double())
    w13_bf16, w2_bf16 = reader.read_experts(0, [4], torch.bfloat16)[4]
    w13, w2 = reader.read_experts(0, [4], torch.float32)[4]
    assert torch.equal(w13_bf16, w13.bfloat16()) and torch.equal(w2_bf16, w2.bfloat16())


def test_experts_drawn_into_destinations_equal_the_returned_ones(dummy_model):
    spec = load_model_spec(dummy_model)
    reader = DummyReader(spec, show_progress=False)
    inter, hidden = spec.moe_intermediate_size, spec.hidden_size
    layer_w13 = torch.zeros(3, 2 * inter, hidden, dtype=torch.bfloat16)
    layer_w2 = torch.zeros(3, hidden, inter, dtype=torch.bfloat16)
    out = {7: (layer_w13[1], layer_w2[1])}
    assert reader.read_experts(1, [7], torch.bfloat16, out=out) is out
    w13, w2 = reader.read_experts(1, [7], torch.bfloat16)[7]
    assert torch.equal(layer_w13[1], w13) and torch.equal(layer_w2[1], w2)
    assert not layer_w13[0].any() and not layer_w13[2].any()
    gate = reader.read(["model.layers.1.mlp.experts.7.gate_proj.weight"], torch.bfloat16)
    assert torch.equal(w13[:inter], gate["model.layers.1.mlp.experts.7.gate_proj.weight"])   # gate rows, then up


# -- shapes and loading without a checkpoint --------------------------------------------------------
def test_names_and_shapes_equal_the_tiny_checkpoint(tiny_model):
    spec = load_model_spec(tiny_model)
    with safe_open(tiny_model / "model.safetensors", framework="pt") as handle:
        real = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    assert checkpoint_shapes(spec) == real
    dummy, checkpoint = DummyReader(spec, show_progress=False), CheckpointReader(tiny_model, show_progress=False)
    assert dummy.has("model.layers.0.mlp.experts.0.up_proj.weight") and not dummy.has("lm_head.bias")
    drawn, read = dummy.read_experts(0, [1], torch.float32)[1], checkpoint.read_experts(0, [1], torch.float32)[1]
    assert [t.shape for t in drawn] == [t.shape for t in read]


def test_dense_layers_and_tied_embeddings(tmp_path):
    from epserve.models.qwen3_moe import load_attention_side

    spec = load_model_spec(write_config(tmp_path / "m", mlp_only_layers=[1], tie_word_embeddings=True))
    shapes = checkpoint_shapes(spec)
    assert spec.moe_layers == (0, 2) and "lm_head.weight" not in shapes
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (64, 96) and "model.layers.1.mlp.gate.weight" not in shapes
    assert not any(name.startswith("model.layers.1.mlp.experts.") for name in shapes)
    model = load_attention_side(spec, DummyReader(spec, show_progress=False), torch.float32)   # every name exists
    assert model.lm_head is model.embed
    with pytest.raises(ModelConfigError, match="no tensors"):
        DummyReader(spec, show_progress=False).read_experts(1, [0], torch.float32)    # layer 1 is dense


def test_a_model_directory_without_safetensors_serves(dummy_model):
    from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
    from epserve.sampling import SamplingParams

    with pytest.raises(ModelConfigError, match="neither model.safetensors"):
        open_weights(dummy_model, "auto", load_model_spec(dummy_model))
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    engines = [build_colocated_engine(str(dummy_model), torch.float32, load_format="dummy") for _ in range(2)]
    runs = [generate_tokens(engine, [[5, 9, 13, 2], [7, 7]], params) for engine in engines]
    assert runs[0] == runs[1] and all(len(tokens) == 6 for tokens in runs[0])


def test_open_weights_picks_the_reader_and_flags_are_checked(tiny_model, dummy_model):
    from epserve.attention_worker.config import AttentionWorkerConfig
    from epserve.cli import build_parser
    from epserve.deployment_config import LOAD_FORMATS as DEPLOYMENT_LOAD_FORMATS
    from epserve.deployment_config import DeploymentConfig
    from epserve.expert_worker.config import ExpertWorkerConfig

    spec = load_model_spec(tiny_model)
    assert isinstance(open_weights(tiny_model, "auto", spec), CheckpointReader)
    assert isinstance(open_weights(tiny_model, "safetensors", spec), CheckpointReader)
    assert isinstance(open_weights(dummy_model, "dummy", spec), DummyReader)
    for make in (lambda: open_weights(tiny_model, "pt", spec),
                 lambda: AttentionWorkerConfig(str(tiny_model), "127.0.0.1:1", load_format="pt"),
                 lambda: ExpertWorkerConfig(str(tiny_model), "127.0.0.1:1", load_format="pt"),
                 lambda: DeploymentConfig(str(tiny_model), load_format="pt")):
        with pytest.raises(ValueError, match="--load-format must be one of"):
            make()
    assert DEPLOYMENT_LOAD_FORMATS == LOAD_FORMATS
    parser = build_parser()
    for load_format in LOAD_FORMATS:
        assert parser.parse_args(["up", "--load-format", load_format]).load_format == load_format
        args = parser.parse_args(["generate", "--model-path", "m", "--prompt", "p", "--load-format", load_format])
        assert args.load_format == load_format


# -- numerics over depth ----------------------------------------------------------------------------
def rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def reference_forward(spec, w: dict[str, torch.Tensor], ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """A plain Qwen3-MoE prefill of one sequence ids [T] over checkpoint tensors ``w`` (any dtype):
    logits [T, V] (float32) and, per layer, the residual stream and routing statistics."""
    T, H, Hkv, Dh = ids.shape[0], spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    eps, dtype = spec.rms_norm_eps, w["model.norm.weight"].dtype
    inv_freq = 1.0 / spec.rope_theta ** (torch.arange(0, Dh, 2).float() / Dh)
    angles = torch.arange(T).float()[:, None] * inv_freq
    cos, sin = (torch.cat([f(angles)] * 2, -1)[:, None].to(dtype) for f in (torch.cos, torch.sin))   # [T, 1, Dh]

    def norm(x, weight):
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rope(x):
        return x * cos + torch.cat([-x[..., Dh // 2:], x[..., :Dh // 2]], -1) * sin

    hidden, stats = w["model.embed_tokens.weight"][ids], []
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        x = norm(hidden, w[p + "input_layernorm.weight"])
        q = rope(norm(F.linear(x, w[p + "self_attn.q_proj.weight"]).view(T, H, Dh), w[p + "self_attn.q_norm.weight"]))
        k = rope(norm(F.linear(x, w[p + "self_attn.k_proj.weight"]).view(T, Hkv, Dh), w[p + "self_attn.k_norm.weight"]))
        v = F.linear(x, w[p + "self_attn.v_proj.weight"]).view(T, Hkv, Dh)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                              enable_gqa=True).transpose(0, 1).reshape(T, H * Dh)
        attn_out = F.linear(attn, w[p + "self_attn.o_proj.weight"])
        hidden = hidden + attn_out
        x = norm(hidden, w[p + "post_attention_layernorm.weight"])
        probs = torch.softmax(F.linear(x, w[p + "mlp.gate.weight"]).float(), dim=-1)     # [T, E]
        top_w, top_ids = probs.topk(spec.num_experts_per_tok, dim=-1)                    # [T, K]
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
        moe_out = torch.zeros_like(x)
        for e in top_ids.unique().tolist():
            rows, k_index = (top_ids == e).nonzero(as_tuple=True)
            gate, up, down = (w[p + f"mlp.experts.{e}.{n}_proj.weight"] for n in ("gate", "up", "down"))
            y = F.linear(F.silu(F.linear(x[rows], gate)) * F.linear(x[rows], up), down)
            moe_out.index_add_(0, rows, y * top_w[rows, k_index, None])
        hidden = hidden + moe_out
        counts = torch.bincount(top_ids.flatten(), minlength=spec.num_experts).float()
        unit = F.normalize(hidden.float(), dim=-1)
        stats.append(dict(residual=rms(hidden), attn=rms(attn_out), moe=rms(moe_out),
                          top1=float(top_w[:, 0].float().mean()), max_share=float(counts.max() / counts.sum()),
                          experts_used=int((counts > 0).sum()),
                          cosine=float((unit @ unit.T)[~torch.eye(T, dtype=torch.bool)].mean())))
    return F.linear(norm(hidden, w["model.norm.weight"]), w["lm_head.weight"]).float(), stats


def test_48_layers_stay_sane_in_bfloat16(tmp_path):
    """Qwen3-30B-A3B's depth, top-8 routing and GQA ratio at a reduced width (fan-in scaling is width-free)."""
    spec = load_model_spec(write_config(tmp_path / "deep", num_hidden_layers=48, hidden_size=128,
                                        moe_intermediate_size=48, num_attention_heads=8, num_key_value_heads=1,
                                        head_dim=32, vocab_size=2048, num_experts=32, num_experts_per_tok=8))
    reader = DummyReader(spec, show_progress=False)
    ids = torch.randint(0, spec.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    logits32, _ = reference_forward(spec, reader.read(list(reader.shapes), torch.float32), ids)
    logits16, stats = reference_forward(spec, reader.read(list(reader.shapes), torch.bfloat16), ids)
    E, K = spec.num_experts, spec.num_experts_per_tok
    for layer, s in enumerate(stats):
        assert 0.5 < s["residual"] < 4, (layer, s)                   # neither vanishing nor growing with depth
        assert 0.005 < s["attn"] < 1 and 0.005 < s["moe"] < 1, (layer, s)     # every block still contributes
        assert s["cosine"] < 0.2, (layer, s)                        # tokens stay distinct ...
        assert s["experts_used"] >= E // 2 and s["max_share"] < 2.5 / E, (layer, s)   # ... and spread over experts
        assert s["top1"] > 1.5 / K, (layer, s)                      # a token's top-K weights are not uniform
    assert torch.isfinite(logits16).all() and 0.5 < float(logits16.std()) < 2
    assert float(torch.corrcoef(torch.stack([logits16.flatten(), logits32.flatten()]))[0, 1]) > 0.99


# -- placement: dummy and real weights are different models ----------------------------------------
def test_fingerprint_tells_dummy_from_real_weights(tiny_model):
    real = model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model, "safetensors") == model_fingerprint(tiny_model, "auto") == real
    assert model_fingerprint(tiny_model, "dummy") != real and "dummy" in model_fingerprint(tiny_model, "dummy")


@pytest.mark.parametrize("placement_format,worker_format", [("auto", "dummy"), ("dummy", "safetensors")])
def test_placement_refuses_a_worker_on_other_weights(tiny_model, placement_format, worker_format):
    from epserve.placement_service.config import PlacementConfig
    from epserve.placement_service.server import start_placement_server

    server = start_placement_server(PlacementConfig(str(tiny_model), load_format=placement_format, dp_size=1, ep_size=1,
                                                    shutdown_grace_s=0.5))
    clients = []
    try:
        def client(worker_id: str, role: WorkerRole, load_format: str) -> PlacementClient:
            clients.append(PlacementClient(f"127.0.0.1:{server.port}", worker_id, role, "127.0.0.1:1",
                                           model_fingerprint=model_fingerprint(tiny_model, load_format), timeout_s=5))
            return clients[-1]

        with pytest.raises(grpc.RpcError) as refused:
            client("mixed", WorkerRole.EXPERT, worker_format).register(deadline_s=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not match" in refused.value.details() and "dummy-weights" in refused.value.details()
        assert client("same", WorkerRole.EXPERT, placement_format).register(deadline_s=10).world_size == 2
    finally:
        for c in clients:
            c.close()
        server.stop()


# -- GPU: a Qwen3-30B-A3B-shaped model in seconds ----------------------------------------------------
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qwen3_30b_a3b_shaped_model_draws_on_the_gpu_in_seconds(tmp_path):
    from epserve.expert_map import ExpertMap
    from epserve.models.qwen3_moe import load_attention_side

    spec = load_model_spec(write_config(tmp_path / "qwen3", **QWEN3_30B_A3B))
    reader = DummyReader(spec, show_progress=False)
    load_attention_side(spec, reader, torch.bfloat16, "cuda")          # warm-up: CUDA context, allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    model = load_attention_side(spec, reader, torch.bfloat16, "cuda")
    every_expert = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts).phy2log        # [L, E]
    slots = load_expert_slots(spec, reader, every_expert, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    num_bytes = sum(t.numel() * t.element_size() for t in (*slots.w13, *slots.w2))
    print(f"Qwen3-30B-A3B-shaped dummy load: {elapsed:.2f} s, experts {num_bytes / 2**30:.1f} GiB")
    assert num_bytes > 50 * 2**30 and elapsed < 20
    layer = spec.moe_layers[-1]
    again = reader.read_experts(layer, [17], torch.float32, "cuda")[17]
    assert torch.equal(slots.w13[-1][17], again[0].bfloat16()) and torch.equal(slots.w2[-1][17], again[1].bfloat16())
    names = ["model.embed_tokens.weight", "model.layers.3.self_attn.o_proj.weight"]
    fp32, bf16 = (reader.read(names, dtype, "cuda") for dtype in (torch.float32, torch.bfloat16))
    assert all(t.is_cuda and torch.equal(bf16[n], fp32[n].bfloat16()) for n, t in bf16.items())
    assert torch.isfinite(slots.w2[-1].float()).all() and model.embed.is_cuda


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_up_serves_the_tokens_generate_computes(dummy_model, tmp_path):
    """`epserve up --load-format dummy` (2 expert workers, redundant replicas) on a directory without
    weights serves, through the gateway, the greedy text `epserve generate --load-format dummy` computes."""
    prompt, common = "Once upon a time", ["--load-format", "dummy", "--dtype", "float64"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    colocated = subprocess.run([sys.executable, "-m", "epserve", "generate", "--model-path", str(dummy_model), *common,
                                "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0"],
                               capture_output=True, text=True, timeout=180, cwd=REPO_ROOT, env=env)
    assert colocated.returncode == 0, colocated.stderr
    assert colocated.stdout
    args = ["--model-path", str(dummy_model), *common, "--attention-workers", "1", "--expert-workers", "2",
            "--ep-num-redundant-experts", "2"]
    with epserve_up(args, tmp_path / "logs") as endpoints:
        served = subprocess.run([sys.executable, "-m", "epserve", "generate", "--gateway", endpoints["gateway"],
                                 "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0"],
                                capture_output=True, text=True, timeout=180, cwd=REPO_ROOT, env=env)
        assert served.returncode == 0, served.stderr
        assert served.stdout == colocated.stdout
