"""Parity of the colocated engine with transformers' reference implementation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.expert_routing import DispatchAlgorithm, ExpertRouter
from epserve.attention_worker.attention_torch import TorchPagedAttention
from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.attention_worker.moe_executor import InProcessExperts, run_micro_batches
from epserve.sampling import SamplingParams
from epserve.expert_map import ExpertMap
from epserve.model_config import load_model_spec
from epserve.models.expert_side import load_expert_slots
from epserve.models.decoder import ForwardBatch
from epserve.models.qwen3_moe import load_attention_side
from epserve.moe_runner import make_moe_runner
from epserve.weights import CheckpointReader

transformers = pytest.importorskip("transformers")

PROMPTS = ["Hello world, this is a test of the engine.", "The quick brown fox", "café naïve 東京 🙂 ok",
           "def f(x):\n    return x * 2"]


def reference(model_dir, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, experts_implementation="eager")
    return model.eval(), transformers.AutoTokenizer.from_pretrained(model_dir)


def ragged_logits(model_dir, prompts_ids, dtype, num_micro_batches=1):
    """All-position logits of a ragged batch through our attention side + in-process experts."""
    spec = load_model_spec(model_dir)
    reader = CheckpointReader(model_dir)
    model = load_attention_side(spec, reader, dtype)
    expert_map = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts, 0, ("local",))
    executor = InProcessExperts(load_expert_slots(spec, reader, expert_map.phy2log, dtype),
                                make_moe_runner("torch"), ExpertRouter(DispatchAlgorithm.STATIC, 0))
    cache = PagedKVCache(spec.num_hidden_layers, 64, 4, spec.num_key_value_heads, spec.head_dim, dtype)
    attention = TorchPagedAttention(cache, spec)
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


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("num_micro_batches", [1, 2])
def test_ragged_batch_logits_match_transformers(tiny_model, dtype, tolerance, num_micro_batches):
    ref, tok = reference(tiny_model, dtype)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = ragged_logits(tiny_model, ids, dtype, num_micro_batches)
    for prompt_ids, got in zip(ids, ours):
        with torch.no_grad():
            want = ref(torch.tensor([prompt_ids])).logits[0].float()
        rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert rel <= tolerance, f"relative error {rel:.3e} > {tolerance}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_continuations_identical(tiny_model_factory, seed):
    model_dir = tiny_model_factory(seed=seed)
    ref, tok = reference(model_dir, torch.float64)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine = build_colocated_engine(str(model_dir), torch.float64)
    ours = generate_tokens(engine, ids, SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    for prompt_ids, got in zip(ids, ours):
        want = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert got == want


def test_generate_cli_prints_transformers_greedy_text(tiny_model):
    ref, tok = reference(tiny_model, torch.float64)
    prompt = "Once upon a time"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    want_ids = ref.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
    want = tok.decode(want_ids, skip_special_tokens=True)
    result = subprocess.run(
        [sys.executable, "-m", "epserve", "generate", "--model-path", str(tiny_model), "--prompt", prompt,
         "--max-new-tokens", "32", "--temperature", "0", "--dtype", "float64"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == want


def test_sharded_checkpoint_gives_same_logits(tiny_model, tiny_model_factory):
    sharded = tiny_model_factory(seed=0, max_shard_size=20_000)
    assert (sharded / "model.safetensors.index.json").exists()
    ids = [[5, 17, 300, 42, 7]]
    assert torch.equal(ragged_logits(tiny_model, ids, torch.float64)[0],
                       ragged_logits(sharded, ids, torch.float64)[0])


def test_expert_subset_load_reads_only_those_experts(tiny_model_factory):
    model_dir = tiny_model_factory(seed=0, max_shard_size=20_000)
    spec = load_model_spec(model_dir)
    reader = CheckpointReader(model_dir, show_progress=False)
    slot_experts = torch.tensor([[1, 5, -1], [2, 2, 7]])[: spec.num_moe_layers]
    slots = load_expert_slots(spec, reader, slot_experts, torch.float64)
    wanted = {(0, 1), (0, 5), (1, 2), (1, 7)}
    touched = {(int(n.split(".")[2]), int(n.split(".")[5])) for n in reader.tensors_read}
    assert touched == wanted
    assert len(reader.tensors_read) == 3 * len(wanted)
    full = CheckpointReader(model_dir, show_progress=False).read(
        ["model.layers.1.mlp.experts.7.down_proj.weight"], torch.float64)
    assert torch.equal(slots.w2[1][2], full["model.layers.1.mlp.experts.7.down_proj.weight"])
    assert slots.w13[0][2].abs().sum() == 0          # the empty slot stays empty


def test_held_experts_are_copied_not_read_again(tiny_model_factory):
    """A new map's slots reuse experts a held version already has (any slot of that layer);
    only experts new to this worker are read, and the weights equal a fresh load."""
    model_dir = tiny_model_factory(seed=0)
    spec = load_model_spec(model_dir)
    reader = CheckpointReader(model_dir, show_progress=False)
    held = load_expert_slots(spec, reader, torch.tensor([[1, 5, 3], [2, 4, 7]]), torch.float64)
    reader.tensors_read.clear()
    new_map = torch.tensor([[5, 1, 6], [7, 7, -1]])            # swapped, one new expert, a replica, an empty slot
    slots = load_expert_slots(spec, reader, new_map, torch.float64, held=[held])
    touched = {(int(n.split(".")[2]), int(n.split(".")[5])) for n in reader.tensors_read}
    assert touched == {(spec.moe_layers[0], 6)}
    fresh = load_expert_slots(spec, CheckpointReader(model_dir, show_progress=False), new_map, torch.float64)
    for layer in range(2):
        assert torch.equal(slots.w13[layer], fresh.w13[layer]) and torch.equal(slots.w2[layer], fresh.w2[layer])
    assert not slots.w13[1][2].any(), "an empty slot holds zeros"


def test_fused_expert_layout_loads_the_same_slots(tiny_model_factory, tmp_path):
    """A checkpoint with fused expert tensors (gate_up_proj [E, 2I, D], down_proj [E, D, I]) gives
    the same slots as the per-expert Hub layout, both read into fresh tensors and copied from the
    mapped file into held slots."""
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = tiny_model_factory(seed=0)
    spec = load_model_spec(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    fused_state = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for layer in spec.moe_layers:
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(spec.num_experts)
        fused_state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(
            [state[f"{prefix}.{e}.gate_proj.weight"], state[f"{prefix}.{e}.up_proj.weight"]]) for e in experts])
        fused_state[f"{prefix}.down_proj"] = torch.stack([state[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    for name in model_dir.iterdir():
        if name.suffix == ".json" and name.name != "model.safetensors.index.json":
            shutil.copy(name, fused_dir / name.name)
    save_file(fused_state, str(fused_dir / "model.safetensors"))
    slot_experts = torch.tensor([[3, 0, -1], [6, 6, 1]])
    want = load_expert_slots(spec, CheckpointReader(model_dir, show_progress=False), slot_experts, torch.float64)
    fused_reader = CheckpointReader(fused_dir, show_progress=False)
    got = load_expert_slots(spec, fused_reader, slot_experts, torch.float64)
    for layer in range(2):
        assert torch.equal(got.w13[layer], want.w13[layer]) and torch.equal(got.w2[layer], want.w2[layer])
    experts = fused_reader.read_experts(spec.moe_layers[1], [6, 1], torch.float64)     # no destinations
    assert torch.equal(experts[6][0], want.w13[1][0]) and torch.equal(experts[1][1], want.w2[1][2])
