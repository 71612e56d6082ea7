"""Where the tiny GPT-OSS's GPU logits part from transformers' (diagnostic, issue 17): float32 prompt
logits of the GPU engine (Triton sink attention), transformers on the CPU and transformers on the GPU;
pairwise relative errors (worst prompt), and where along the prompt the GPU engine first parts.

Run on the GPU machine (the engine refuses GPT-OSS on the Triton GPU backend without the opt-in):
``EPSERVE_GPT_OSS_TRITON=1 PYTHONPATH=.:tests:tests/attention_worker python3 bench/gpu/diag_gpt_oss.py``
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

import torch
import transformers

from epserve.attention_worker.colocated import build_colocated_engine
from epserve.attention_worker.engine import EngineLimits
from family_parity import OPTIONS
from test_gpu_engine import PROMPTS, prompt_logits


def main() -> None:
    model_dir = tempfile.mkdtemp() + "/m"
    args = [sys.executable, "-m", "epserve", "make-tiny-model", model_dir, "--arch", "gpt_oss", "--seed", "0"]
    for key, value in OPTIONS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(args, check=True)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    limits = dict(num_kv_blocks=256, kv_block_size=16, max_num_batched_tokens=512, max_num_seqs=16,
                  num_micro_batches=1, cuda_graph_max_bs=16)
    rows = {}
    engine = build_colocated_engine(model_dir, torch.float32, "cuda", moe_runner_backend="torch",
                                    limits=EngineLimits(**limits))
    rows["gpu_triton"] = [x.double().cpu() for x in prompt_logits(engine, ids)]
    for name, device in (("hf_cpu", "cpu"), ("hf_gpu", "cuda")):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                  experts_implementation="eager").to(device).eval()
        print(name, "attn_implementation", model.config._attn_implementation)
        with torch.no_grad():
            rows[name] = [model(torch.tensor([p], device=device)).logits[0].double().cpu() for p in ids]
    names = list(rows)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            rel = max(((x - y).norm() / y.norm()).item() for x, y in zip(rows[a], rows[b]))
            print(f"{a:18s} vs {b:18s} rel {rel:.3e}")
    for k, (x, y) in enumerate(zip(rows["gpu_triton"], rows["hf_cpu"])):
        per_pos = ((x - y).norm(dim=-1) / y.norm(dim=-1)).tolist()
        print(f"prompt {k} ({len(per_pos)} tokens): per-position rel vs hf_cpu", [f"{v:.1e}" for v in per_pos])


if __name__ == "__main__":
    main()
