"""Variants of the colocated engine's decode step, timed back to back in one process (issue 12).

Run from the repository root on the GPU machine:
    PYTHONPATH=. python3 bench/gpu/engine_ab.py --out bench/results/engine_ab.json [--layers 48]

One engine (Qwen3-30B-A3B shape, dummy weights, bf16, ``bench/serve_gpu.py``'s model) is built
once; for each variant the knobs are set, the decode CUDA graphs are captured again, and the same
decode run is timed at each batch size (median ``Engine.step`` while all sequences decode, as
serve_gpu times it). The first variant runs again at the end, so the spread between its two runs
bounds the drift. Variants:
- ``unfused_input``: residual add + norm, the QKV GEMM (cuBLAS), q/k norm + RoPE + store: three launches;
- ``fused_input ...``: the three in one launch (``kernels/norm_qkv_rope.py``, the default at ≤ 8 tokens)
  at several tile shapes (block_n, block_k, warps);
- ``fused + down_ahead ...``: and the MoE down GEMV loading its weights before its PDL wait
  (``GemvConfig.down_ahead``) at several tiles;
- ``... o_proj prefetched``: o_proj as ``kernels/dense_gemv.py``'s GEMV, weights loaded before its wait
  (the default at decode sizes) instead of cuBLAS.
``--overlap on|off|both`` runs each variant with the engine's overlap schedule, without it, or both;
``--gate-up-tiles`` adds the defaults with other tiles of the one-token gate_up GEMV (the tables' were tuned
on the kernel alone).
The split-KV merge by the last split (``DecodeConfig.merge="fused"``) was timed against a merge kernel in
an earlier run (``bench/results/engine_ab_h100_prefetch.json``) and is the default. That run also timed
prefetching each layer's projections into L2 from a side stream: slower, and removed. Other forms of the attention
projections were timed alone (``bench/gpu/dense_gemv.py``): no faster than ``F.linear``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_gpu import prompts, write_model_dir  # noqa: E402

# name, the one-launch attention input (kernels/norm_qkv_rope.py: "block_n,block_k,warps"; None = off),
# the MoE down GEMV with its weights loaded ahead ("down_block_n,down_block_k,down_warps"; None = the table's;
# "off": the table's without it),
# o_proj at decode sizes: "prefetched" (kernels/dense_gemv.py, the default) or "cublas" (F.linear)
VARIANTS = [
    ("unfused_input", None, None, "cublas"),
    ("fused_input", "8,1024,4", None, "cublas"),
    ("fused_input bk512", "8,512,4", None, "cublas"),
    ("fused_input bn16", "16,512,4", None, "cublas"),
    ("fused_input bn4", "4,2048,4", None, "cublas"),
    ("fused + o_proj prefetched", "8,1024,4", None, "prefetched"),
    ("fused + down_ahead", "8,1024,4", "2,128,8", "cublas"),
    ("fused + down_ahead bk512", "8,1024,4", "2,512,8", "cublas"),
    ("fused + down_ahead bn4 bk256", "8,1024,4", "4,256,8", "cublas"),
    ("all: fused + prefetched + down_ahead", "8,1024,4", "2,128,8", "prefetched"),
    ("unfused_input (again)", None, None, "cublas"),
    # after call Q: the defaults (fused input 8x512 at one token, o_proj prefetched at <= 2, the tables' down_ahead)
    # against the step as it was before this session
    ("before: three launches, cuBLAS o_proj, no down_ahead", None, "off", "cublas"),
    ("defaults", "8,512,4", None, "prefetched"),
    ("defaults + down_ahead", "8,512,4", "2,128,8", "prefetched"),
    ("before (again)", None, "off", "cublas"),
]


def _ints(spec: str) -> tuple[int, ...]:
    return tuple(int(v) for v in spec.split(","))


def apply(engine, fused_input: str | None, down_ahead: str | None, o_proj: str, gate_up: str | None = None) -> None:
    """``gate_up``: the one-token MoE gate_up GEMV's tile "block_n,block_k,warps" (None: the table's)."""
    import torch.nn.functional as F

    from epserve.attention_worker.cuda_graphs import DecodeGraphs
    from epserve.kernels.moe_configs import get_config
    from epserve.kernels.moe_gemv import GemvConfig
    from epserve.kernels.norm_qkv_rope import NormQkvConfig, add_norm_qkv_rope_store
    from epserve.models.ops import triton_ops

    runner = engine.runner
    runner.attention.fused_input = fused_input is not None
    if fused_input is not None:
        block_n, block_k, warps = _ints(fused_input)
        runner.attention._norm_qkv_rope = functools.partial(
            add_norm_qkv_rope_store, config=NormQkvConfig(block_n=block_n, block_k=block_k, num_warps=warps))
    ops = triton_ops()
    engine.model.ops = ops if o_proj == "prefetched" else dataclasses.replace(ops, linear=F.linear)

    def moe_config(*args):
        config = get_config(*args)
        if isinstance(config, GemvConfig) and gate_up is not None:
            block_n, block_k, warps = _ints(gate_up)
            config = dataclasses.replace(config, block_n=block_n, block_k=block_k, num_warps=warps)
        if down_ahead is None or not isinstance(config, GemvConfig):
            return config
        if down_ahead == "off":
            return dataclasses.replace(config, down_ahead=False)
        block_n, block_k, warps = _ints(down_ahead)
        return dataclasses.replace(config, down_variant="all_choices", down_ahead=True, down_block_n=block_n,
                                   down_block_k=block_k, down_num_warps=warps)

    runner.executor.runner._get_config = moe_config
    runner.graphs = DecodeGraphs(runner, runner.graphs.max_bs)
    runner.graphs.capture(engine._expert_map)


def time_decode(engine, batch: int, prompt_len: int, new_tokens: int) -> float:
    from epserve.attention_worker.sampler import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts(batch, prompt_len, engine.model.spec.vocab_size, seed=batch)):
        engine.add_request(f"ab{batch}-{i}-{time.monotonic_ns()}", ids, params)
    times, decode = [], False
    while engine.has_work:
        t0 = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - t0
        if decode and len(engine.scheduler.running) == batch:
            times.append(elapsed)
        decode = not engine.scheduler.waiting and all(s.num_generated >= 1 for s in engine.scheduler.running)
    return statistics.median(times[2:] or times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--variants", nargs="*", default=None, help="names from VARIANTS (default: all)")
    parser.add_argument("--gate-up-tiles", nargs="*", default=[],
                        help='more variants: the defaults with the one-token gate_up GEMV tile "block_n,block_k,warps"')
    parser.add_argument("--overlap", choices=["on", "off", "both"], default="on",
                        help="the engine's overlap schedule in each variant (both: each variant twice)")
    args = parser.parse_args()
    from epserve.attention_worker.colocated import build_colocated_engine
    from epserve.attention_worker.engine import EngineLimits

    max_bs = max(args.batches)
    context = args.prompt_len + args.new_tokens
    limits = EngineLimits(num_kv_blocks=max_bs * -(-context // 16) + 64, kv_block_size=16,
                          max_num_batched_tokens=8192, max_num_seqs=max_bs, num_micro_batches=1,
                          cuda_graph_max_bs=max_bs)
    model_dir = write_model_dir("qwen3-30b-a3b", args.layers)
    engine = build_colocated_engine(str(model_dir), torch.bfloat16, "cuda", "auto", limits,
                                    max_context=context + 16, load_format="dummy")
    rows = []
    chosen = [(*v, None) for v in VARIANTS if args.variants is None or v[0] in args.variants]
    chosen += [(f"defaults, gate_up {tile}", "8,512,4", None, "prefetched", tile) for tile in args.gate_up_tiles]
    overlaps = {"on": [True], "off": [False], "both": [True, False]}[args.overlap]
    variants = [(name + ("" if overlap else ", no overlap schedule"), overlap, *knobs)
                for name, *knobs in chosen for overlap in overlaps]
    for name, overlap, fused_input, down_ahead, o_proj, gate_up in variants:
        apply(engine, fused_input, down_ahead, o_proj, gate_up)
        engine.overlap = overlap
        for batch in args.batches:
            ms = time_decode(engine, batch, args.prompt_len, args.new_tokens)
            rows.append({"variant": name, "overlap_schedule": overlap, "fused_input": fused_input,
                         "down_ahead": down_ahead, "o_proj": o_proj, "gate_up": gate_up, "batch": batch,
                         "step_ms": ms})
            print(f"{name:28s} B={batch:4d} {ms:7.3f} ms/step", flush=True)
    print("\n| variant | " + " | ".join(f"B={b} ms" for b in args.batches) + " |")
    print("|---|" + "---|" * len(args.batches))
    for name, *_ in variants:
        cells = [f"{r['step_ms']:.3f}" for r in rows if r["variant"] == name]
        print(f"| {name} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                    "command": " ".join(sys.argv), "layers": args.layers, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
