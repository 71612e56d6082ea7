"""Helpers of the model-family parity tests (Mixtral, GLM-4-MoE, GPT-OSS): transformers' reference, ragged
logits through a family's attention side, CPU attention backend and in-process experts, greedy tokens through
the colocated engine."""

from __future__ import annotations

import json
import shutil

import torch
import transformers

from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.engine import EngineLimits
from epserve.attention_worker.expert_routing import DispatchAlgorithm, ExpertRouter
from epserve.attention_worker.model_family import model_family
from epserve.attention_worker.moe_executor import InProcessExperts, run_micro_batches
from epserve.sampling import SamplingParams
from epserve.expert_map import ExpertMap
from epserve.model_config import load_model_spec
from epserve.models.expert_side import load_expert_slots
from epserve.models.ops import TORCH_OPS
from epserve.models.decoder import ForwardBatch
from epserve.moe_runner import make_moe_runner
from epserve.weights import CheckpointReader

PROMPTS = ["Hello world, this is a test of the engine.", "The quick brown fox", "café naïve 東京 🙂 ok",
           "def f(x):\n    return x * 2"]
# 3 layers (GLM: the first dense), 16 experts (GLM: 4 groups of which 2 are kept), top-4
OPTIONS = dict(num_layers=3, num_experts=16, top_k=4, hidden_size=64, moe_intermediate_size=32,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def reference(model_dir, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, experts_implementation="eager")
    return model.eval(), transformers.AutoTokenizer.from_pretrained(model_dir)


def with_config(model_dir, tmp_path, name, **changes):
    """A copy of ``model_dir`` whose config.json has ``changes``."""
    out = tmp_path / name
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    return out


def ragged_logits(model_dir, prompts_ids, dtype, num_micro_batches=1):
    """All-position logits of a ragged batch (one prefill per prompt) through the family's attention side,
    its CPU attention backend and in-process experts."""
    spec = load_model_spec(model_dir)
    family = model_family(spec)
    reader = CheckpointReader(model_dir, show_progress=False)
    model = family.load_attention_side(spec, reader, dtype, "cpu", TORCH_OPS)
    expert_map = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts, 0, ("local",))
    executor = InProcessExperts(load_expert_slots(spec, reader, expert_map.phy2log, dtype),
                                make_moe_runner("torch"), ExpertRouter(DispatchAlgorithm.STATIC, 0))
    attention = family.make_cpu_attention(family.make_kv_cache(spec, 64, 4, dtype, "cpu"), spec)
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


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def assert_logits_match(model_dir, dtype, tolerance, num_micro_batches=1, prompts=PROMPTS):
    ref, tok = reference(model_dir, dtype)
    ids = [tok(p)["input_ids"] for p in prompts]
    for prompt_ids, got in zip(ids, ragged_logits(model_dir, ids, dtype, num_micro_batches)):
        with torch.no_grad():
            want = ref(torch.tensor([prompt_ids])).logits[0].float()
        assert relative_error(got, want) <= tolerance


def assert_greedy_matches(model_dir, max_new_tokens=24, limits=EngineLimits(), prompts=PROMPTS):
    ref, tok = reference(model_dir, torch.float64)
    ids = [tok(p)["input_ids"] for p in prompts]
    engine = build_colocated_engine(str(model_dir), torch.float64, limits=limits)
    ours = generate_tokens(engine, ids, SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True))
    for prompt_ids, got in zip(ids, ours):
        want = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert got == want


# float64: every RMSNorm (GLM's q/k norms too) rounds through float32, in transformers as here; our attention
# (another SDPA call per sequence) differs from the reference's in the last float64 bits, and now and then that
# flips one float32 rounding: ~1e-8 relative in the logits (measured 1.5e-8 on one GLM prompt, 0 on the others).
FLOAT64_TOLERANCE = 1e-7
