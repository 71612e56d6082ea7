"""Why does bf16 greedy decoding leave float32's? One component at a time, against transformers.

    PYTHONPATH=. python3 bench/gpu/diag_bf16.py

On the tiny test model (seed 0) and the prompts of tests/attention_worker/test_gpu_engine.py: the
float32 engine is the reference; every bf16 variant reports its greedy agreement with it
(positions equal, 4 prompts × 24 tokens) and the relative error of its prompt logits. transformers'
own bf16 against its float32 is the baseline of what bf16 costs on this model. Variants swap one
part for its torch reference: the MoE runner, the attention backend, the fused layer operations,
CUDA graphs.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens  # noqa: E402
from epserve.attention_worker.engine import EngineLimits  # noqa: E402
from epserve.models.ops import TORCH_OPS  # noqa: E402
from epserve.sampling import SamplingParams  # noqa: E402
from epserve.tiny_model import make_tiny_model  # noqa: E402

PROMPTS = [[5, 17, 300, 42, 7], [9] * 23, [1, 2, 3], list(range(40, 77))]
NEW = 24


def engine(model_dir, dtype, moe="auto", attention="auto", graphs=True, torch_ops=False):
    limits = EngineLimits(num_kv_blocks=256, kv_block_size=16, max_num_batched_tokens=512, max_num_seqs=16,
                          num_micro_batches=1, cuda_graph_max_bs=16, disable_cuda_graph=not graphs,
                          attention_backend=attention)
    e = build_colocated_engine(str(model_dir), dtype, "cuda", moe, limits)
    if torch_ops:
        e.model.ops = TORCH_OPS
    return e


def prompt_logits(e) -> list[torch.Tensor]:
    out = []
    for ids in PROMPTS:        # one prompt per step through the runner, all positions' logits
        e.add_request("p", ids, SamplingParams(temperature=0, max_new_tokens=1))
        e._apply_inbox()
        chunks = e.scheduler.schedule()
        runner = e.runner
        for chunk in chunks:
            runner._admit(chunk.seq)
        runner._apply_block_table_updates(runner._block_table_updates(chunks))
        batch = runner.eager_batch(chunks, decode=False)
        batch.logits_rows = None
        runner.executor.prepare(e.expert_map, runner.device)
        out.append(runner.forward(batch, e.expert_map).float().cpu())
        e.abort("p")
        while e.has_work:
            e.step()
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    return same / sum(map(len, a))


def first_divergence(a, b) -> list[int]:
    return [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), -1) for p, q in zip(a, b)]


def main() -> None:
    import transformers

    greedy = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", seed=0)
        results = {}
        hf = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
            toks, logits = [], []
            for ids in PROMPTS:
                x = torch.tensor([ids], device="cuda")
                with torch.no_grad():
                    logits.append(model(x).logits[0].float().cpu())
                    toks.append(model.generate(x, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                               pad_token_id=0)[0, len(ids):].tolist())
            hf[dtype] = (toks, logits)
            del model
        ref = engine(model_dir, torch.float32)
        ref_toks = generate_tokens(ref, PROMPTS, greedy)
        ref_logits = prompt_logits(ref)
        del ref

        def rel(a, b):
            return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))

        results["ours fp32 vs transformers fp32"] = {
            "agree": agreement(ref_toks, hf[torch.float32][0]), "logits_rel": rel(ref_logits, hf[torch.float32][1]),
            "diverge_at": first_divergence(ref_toks, hf[torch.float32][0])}
        results["transformers bf16 vs transformers fp32"] = {
            "agree": agreement(hf[torch.bfloat16][0], hf[torch.float32][0]),
            "logits_rel": rel(hf[torch.bfloat16][1], hf[torch.float32][1]),
            "diverge_at": first_divergence(hf[torch.bfloat16][0], hf[torch.float32][0])}
        variants = {"bf16 default": {}, "bf16 moe=torch": {"moe": "torch"},
                    "bf16 attention=torch_native": {"attention": "torch_native"},
                    "bf16 torch layer ops": {"torch_ops": True, "graphs": False},
                    "bf16 no graphs": {"graphs": False},
                    "bf16 all torch": {"moe": "torch", "attention": "torch_native", "torch_ops": True,
                                       "graphs": False}}
        for name, kw in variants.items():
            try:
                e = engine(model_dir, torch.bfloat16, **kw)
                toks = generate_tokens(e, PROMPTS, greedy)
                logits = prompt_logits(e)
                results[name + " vs ours fp32"] = {"agree": agreement(toks, ref_toks), "logits_rel": rel(logits, ref_logits),
                                                   "diverge_at": first_divergence(toks, ref_toks),
                                                   "vs transformers bf16": agreement(toks, hf[torch.bfloat16][0])}
                del e
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported
                results[name] = {"error": repr(exc)[:400]}
            torch.cuda.empty_cache()
    for name, r in results.items():
        print(f"{name:45s} {json.dumps(r)}")
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
